"""Tests for model/data.py on tiny synthetic VOC and YOLO trees (plus one test on shared data)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from builders import SHARED, make_voc, write_image
from torchvision.transforms import v2

from model.config import VOC_CLASSES
from model.data import (
    MIN_BOX_SIZE_PX,
    Annotation,
    DetectionDataset,
    build_transform,
    detection_collate,
    load_class_names,
    read_datasets,
    read_voc,
    read_yolo,
)

CAT, DOG, PERSON = (VOC_CLASSES.index(n) for n in ("cat", "dog", "person"))


def assert_same_annotation(a: Annotation, b: Annotation) -> None:
    assert (a.width, a.height) == (b.width, b.height)
    torch.testing.assert_close(a.boxes, b.boxes)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.difficult, b.difficult)
    assert a.boxes.dtype == torch.float32 and a.labels.dtype == torch.int64
    assert a.difficult.dtype == torch.bool


@pytest.fixture
def warnings_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="model.data")
    return caplog


# ------------------------------------------------------------------------------------------------
# VOC reader
# ------------------------------------------------------------------------------------------------


def test_read_voc_converts_one_based_inclusive_coordinates(tmp_path: Path) -> None:
    root = make_voc(
        tmp_path, {"a": (100, 120, [("dog", 11, 21, 50, 80, 0), ("cat", 1, 1, 100, 120, 0)])}
    )

    (ann,) = read_voc(root, "train")

    assert ann.image_path == root / "JPEGImages" / "a.png"
    assert (ann.width, ann.height) == (100, 120)
    expected = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 100.0, 120.0]])
    torch.testing.assert_close(ann.boxes, expected)
    assert ann.labels.tolist() == [DOG, CAT]
    assert ann.difficult.tolist() == [False, False]


def test_read_voc_keeps_difficult_flag(tmp_path: Path) -> None:
    objects = [("person", 5, 5, 40, 40, 1), ("dog", 10, 10, 30, 30, 0)]
    (ann,) = read_voc(make_voc(tmp_path, {"a": (64, 64, objects)}), "train")

    assert ann.difficult.tolist() == [True, False]
    assert ann.labels.tolist() == [PERSON, DOG]


def test_read_voc_clips_one_pixel_overshoot(tmp_path: Path) -> None:
    # A 0-based exporter writes xmin=0: one pixel out, clipped rather than dropped.
    (ann,) = read_voc(make_voc(tmp_path, {"a": (64, 48, [("dog", 0, 0, 64, 48, 0)])}), "train")

    torch.testing.assert_close(ann.boxes, torch.tensor([[0.0, 0.0, 64.0, 48.0]]))


@pytest.mark.parametrize(
    ("bad_object", "message"),
    [
        (("unicorn", 5, 5, 20, 20, 0), "unknown class 'unicorn'"),
        (("dog", 5, 5, 90, 20, 0), "outside"),
        (("dog", 5, 5, 20, 60, 0), "outside"),
        (("dog", 30, 5, 20, 20, 0), "degenerate"),
        (("dog", "a", 5, 20, 20, 0), "non-numeric"),
    ],
)
def test_read_voc_drops_bad_object_with_warning(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture, bad_object: tuple, message: str
) -> None:
    objects = [("cat", 2, 2, 30, 30, 0), bad_object]
    (ann,) = read_voc(make_voc(tmp_path, {"a": (64, 48, objects)}), "train")

    assert ann.labels.tolist() == [CAT]
    assert ann.boxes.shape == (1, 4)
    (record,) = warnings_log.records
    assert record.levelno == logging.WARNING
    assert "a.xml" in record.getMessage() and message in record.getMessage()


@pytest.mark.parametrize("problem", ["bad_xml", "missing_xml", "missing_image", "bad_image"])
def test_read_voc_skips_broken_image_with_warning(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture, problem: str
) -> None:
    root = make_voc(
        tmp_path,
        {"good": (64, 48, [("cat", 2, 2, 30, 30, 0)]), "bad": (64, 48, [("dog", 2, 2, 9, 9, 0)])},
    )
    if problem == "bad_xml":
        (root / "Annotations" / "bad.xml").write_text("<annotation><object>")
    elif problem == "missing_xml":
        (root / "Annotations" / "bad.xml").unlink()
    elif problem == "missing_image":
        (root / "JPEGImages" / "bad.png").unlink()
    else:
        (root / "JPEGImages" / "bad.png").write_bytes(b"not an image")

    annotations = read_voc(root, "train")

    assert [a.image_path.stem for a in annotations] == ["good"]
    (record,) = warnings_log.records
    assert "bad.xml" in record.getMessage() and "skipped" in record.getMessage()


def test_read_voc_skips_image_whose_objects_are_all_bad(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    root = make_voc(tmp_path, {"a": (64, 48, [("unicorn", 2, 2, 9, 9, 0)]), "b": (64, 48, [])})

    assert read_voc(root, "train") == []
    messages = [r.getMessage() for r in warnings_log.records]
    assert any("a.xml" in m and "unknown class" in m for m in messages)
    assert sum("no valid object" in m for m in messages) == 2


def test_read_voc_missing_split_names_the_path(tmp_path: Path) -> None:
    make_voc(tmp_path, {"a": (64, 48, [("cat", 2, 2, 30, 30, 0)])}, split="train")

    with pytest.raises(ValueError, match=r"ImageSets/Main/val\.txt"):
        read_voc(tmp_path, "val")


@pytest.mark.parametrize("xml_size", [None, (0, 0)])
def test_read_voc_falls_back_to_image_header_size(tmp_path: Path, xml_size: tuple | None) -> None:
    root = make_voc(tmp_path, {"a": (64, 48, [("cat", 2, 2, 30, 30, 0)], xml_size)})

    (ann,) = read_voc(root, "train")

    assert (ann.width, ann.height) == (64, 48)


def test_read_voc_skips_image_whose_size_disagrees(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    root = make_voc(tmp_path, {"a": (64, 48, [("cat", 2, 2, 30, 30, 0)], (128, 96))})

    assert read_voc(root, "train") == []
    assert "128x96 differs" in warnings_log.records[0].getMessage()


def test_read_voc_uses_exif_rotated_size(tmp_path: Path) -> None:
    # Stored 40x20 with orientation 6 (rotate 90): decoded upright it is 20x40, as labelled.
    root = make_voc(tmp_path, {"a": (20, 40, [("cat", 2, 2, 10, 30, 0)])}, ext=".jpg")
    write_image(root / "JPEGImages" / "a.jpg", 40, 20, exif_orientation=6)

    (ann,) = read_voc(root, "train")
    _, target = DetectionDataset([ann], image_size=32, train=False)[0]

    assert (ann.width, ann.height) == (20, 40)
    assert target["orig_size"] == (40, 20)


# ------------------------------------------------------------------------------------------------
# YOLO reader
# ------------------------------------------------------------------------------------------------

# The same two objects as VOC (1-based) and as YOLO lines for a 100x120 image.
VOC_OBJECTS = [("dog", 11, 21, 50, 80, 0), ("person", 1, 61, 100, 120, 0)]
YOLO_LINES = f"{DOG} 0.3 {50 / 120!r} 0.4 {60 / 120!r}\n{PERSON} 0.5 0.75 1.0 0.5\n"


def make_yolo(root: Path, layout: str, split: str = "train") -> Path:
    if layout == "split_dirs":
        image, label = root / "images" / split / "a.png", root / "labels" / split / "a.txt"
    else:
        image, label = root / "images" / "a.png", root / "labels" / "a.txt"
    write_image(image, 100, 120)
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_text(YOLO_LINES)
    if layout == "list_file":
        (root / f"{split}.txt").write_text("images/a.png\n")
    return root


@pytest.mark.parametrize("layout", ["split_dirs", "list_file", "flat"])
def test_read_yolo_matches_voc_reader(tmp_path: Path, layout: str) -> None:
    (voc,) = read_voc(make_voc(tmp_path / "voc", {"a": (100, 120, VOC_OBJECTS)}), "train")
    (yolo,) = read_yolo(make_yolo(tmp_path / "yolo", layout), "train", VOC_CLASSES)

    assert yolo.image_path.name == "a.png"
    assert_same_annotation(yolo, voc)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("20 0.5 0.5 0.2 0.2", "unknown class id 20"),
        ("1.5 0.5 0.5 0.2 0.2", "unknown class id"),
        ("3 0.5 0.5 0.2", "expected 5 fields"),
        ("3 0.5 x 0.2 0.2", "non-numeric"),
        ("3 0.5 0.5 0.0 0.2", "degenerate"),
        ("3 0.95 0.5 0.3 0.2", "outside"),
    ],
)
def test_read_yolo_drops_bad_line_with_warning(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture, line: str, message: str
) -> None:
    root = make_yolo(tmp_path, "split_dirs")
    (root / "labels" / "train" / "a.txt").write_text(YOLO_LINES + line + "\n")

    (ann,) = read_yolo(root, "train", VOC_CLASSES)

    assert ann.labels.tolist() == [DOG, PERSON]
    (record,) = warnings_log.records
    assert "a.txt:3" in record.getMessage() and message in record.getMessage()


def test_read_yolo_skips_image_without_label_file(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    root = make_yolo(tmp_path, "split_dirs")
    write_image(root / "images" / "train" / "b.png", 32, 32)

    assert [a.image_path.name for a in read_yolo(root, "train", VOC_CLASSES)] == ["a.png"]
    assert "b.png" in warnings_log.records[0].getMessage()


def test_read_yolo_without_images_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no YOLO images for split 'val'"):
        read_yolo(tmp_path, "val", VOC_CLASSES)


def test_load_class_names(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("raccoon\n\n kangaroo \n")

    assert load_class_names(path) == ["raccoon", "kangaroo"]

    path.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="duplicates"):
        load_class_names(path)
    with pytest.raises(ValueError, match="missing.names"):
        load_class_names(tmp_path / "missing.names")


def test_read_datasets_concatenates_roots_in_order(tmp_path: Path) -> None:
    first = make_voc(tmp_path / "one", {"a": (64, 48, [("cat", 2, 2, 30, 30, 0)])})
    second = make_voc(tmp_path / "two", {"b": (64, 48, [("dog", 2, 2, 30, 30, 0)])})

    annotations = read_datasets([first, str(second)], "voc", "train")

    assert [a.labels.tolist() for a in annotations] == [[CAT], [DOG]]
    with pytest.raises(ValueError, match="'coco'"):
        read_datasets([first], "coco", "train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        read_datasets([], "voc", "train")


# ------------------------------------------------------------------------------------------------
# Dataset and transforms
# ------------------------------------------------------------------------------------------------


def image_annotation(
    tmp_path: Path,
    width: int,
    height: int,
    boxes: list,
    labels: list,
    difficult: list | None = None,
) -> Annotation:
    """An image with white boxes drawn where the annotation says they are."""
    path = tmp_path / f"img_{width}x{height}_{len(boxes)}.png"
    write_image(path, width, height, tuple(tuple(b) for b in boxes))
    return Annotation(
        image_path=path, width=width, height=height,
        boxes=torch.tensor(boxes, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.int64),
        difficult=torch.tensor(difficult or [False] * len(boxes)),
    )  # fmt: skip


def assert_valid_sample(image: torch.Tensor, target: dict, image_size: int) -> None:
    assert image.shape == (3, image_size, image_size) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    boxes = target["boxes"]
    k = boxes.shape[0]
    assert boxes.shape == (k, 4) and boxes.dtype == torch.float32
    assert target["labels"].shape == (k,) and target["labels"].dtype == torch.int64
    assert target["difficult"].shape == (k,) and target["difficult"].dtype == torch.bool
    assert ((boxes >= 0) & (boxes <= 1)).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_eval_sample_keeps_boxes_exactly_proportional(tmp_path: Path) -> None:
    boxes = [[10, 5, 30, 25], [40, 20, 80, 40]]
    ann = image_annotation(tmp_path, 80, 40, boxes, [CAT, DOG], [True, False])

    image, target = DetectionDataset([ann], image_size=32, train=False)[0]

    assert_valid_sample(image, target, 32)
    expected = torch.tensor([[10 / 80, 5 / 40, 30 / 80, 25 / 40], [0.5, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [CAT, DOG]
    assert target["difficult"].tolist() == [True, False]
    assert target["image_id"] == 0 and target["orig_size"] == (40, 80)
    # The pixels agree: box 0 covers x 4..12, y 4..20 of 32; the top-right corner stays black.
    assert image[:, 6:18, 5:11].min() > 0.9 and image[:, 0:3, 16:].max() < 0.1


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_train_sample_boxes_stay_valid(tmp_path: Path, seed: int) -> None:
    ann = image_annotation(
        tmp_path, 96, 64, [[0, 0, 40, 30], [50, 20, 96, 64], [30, 10, 60, 50]], [CAT, DOG, PERSON]
    )
    dataset = DetectionDataset([ann], image_size=48, train=True)
    torch.manual_seed(seed)

    for _ in range(3):
        image, target = dataset[0]
        assert_valid_sample(image, target, 48)
        sizes = target["boxes"][:, 2:] - target["boxes"][:, :2]
        assert (sizes * 48 >= MIN_BOX_SIZE_PX - 1e-4).all()
        assert set(target["labels"].tolist()) <= {CAT, DOG, PERSON}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_drops_labels_and_difficult_with_vanished_boxes(tmp_path: Path, seed: int) -> None:
    # The 4 px box becomes under 1 px at 48 px input (even scaled by 1.2): always dropped; the
    # large central box survives any 20% translation.
    ann = image_annotation(
        tmp_path, 192, 192, [[0, 0, 4, 4], [48, 48, 144, 144]], [CAT, DOG], [True, False]
    )
    torch.manual_seed(seed)

    image, target = DetectionDataset([ann], image_size=48, train=True)[0]

    assert_valid_sample(image, target, 48)
    assert target["labels"].tolist() == [DOG]
    assert target["difficult"].tolist() == [False]


def test_train_pipeline_flip_maps_x_to_one_minus_x(tmp_path: Path) -> None:
    pipeline = build_transform(32, train=True).transforms
    (flip,) = [t for t in pipeline if isinstance(t, v2.RandomHorizontalFlip)]
    assert flip.p == 0.5
    flip.p = 1.0
    # The real pipeline without its other random steps: resize, flip, clamp, sanitize, to float.
    others = (v2.RandomAffine, v2.ColorJitter)
    flip_only = v2.Compose([t for t in pipeline if not isinstance(t, others)])
    ann = image_annotation(tmp_path, 80, 40, [[10, 5, 30, 25]], [CAT])

    image, target = DetectionDataset([ann], 32, train=True, transform=flip_only)[0]

    x1, y1, x2, y2 = 10 / 80, 5 / 40, 30 / 80, 25 / 40
    torch.testing.assert_close(target["boxes"], torch.tensor([[1 - x2, y1, 1 - x1, y2]]))
    # The pixels moved with the box: white at x 20..24 of 32 (flipped), black at the original place.
    assert image[:, 8:16, 21:23].min() > 0.9 and image[:, 8:16, 5:10].max() < 0.1


def test_mosaic_tiles_four_images_with_their_boxes(tmp_path: Path) -> None:
    ann = image_annotation(tmp_path, 64, 32, [[8, 4, 24, 20]], [CAT], [True])
    # Mosaic followed by resize only, so the tiling itself is checked: with one annotation all
    # four tiles are that image, each squeezed into a 16x16 quadrant of the 32x32 canvas.
    resize_only = build_transform(32, train=False)
    dataset = DetectionDataset([ann], 32, train=True, mosaic=1.0, transform=resize_only)

    image, target = dataset[0]

    assert_valid_sample(image, target, 32)
    base = torch.tensor([8 / 64, 4 / 32, 24 / 64, 20 / 32]) / 2
    offsets = torch.tensor([[0, 0, 0, 0], [0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5], [0.5, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(target["boxes"], base + offsets)
    assert target["labels"].tolist() == [CAT] * 4
    assert target["difficult"].tolist() == [True] * 4
    assert target["orig_size"] == (32, 32)
    # The pixels agree: the bottom-right tile's box covers x 18..22, y 18..26; its left is black.
    assert image[:, 19:25, 19:21].min() > 0.9 and image[:, 19:25, 16:17].max() < 0.1


@pytest.mark.parametrize("seed", [0, 1])
def test_mosaic_train_samples_are_valid(tmp_path: Path, seed: int) -> None:
    annotations = [
        image_annotation(tmp_path, 64, 48, [[4, 4, 40, 40]], [CAT]),
        image_annotation(tmp_path, 48, 64, [[10, 10, 30, 60], [0, 0, 48, 20]], [DOG, PERSON]),
    ]
    dataset = DetectionDataset(annotations, 48, train=True, mosaic=1.0)
    torch.manual_seed(seed)

    for index in range(len(dataset)):
        image, target = dataset[index]
        assert_valid_sample(image, target, 48)
        assert target["image_id"] == index
        assert set(target["labels"].tolist()) <= {CAT, DOG, PERSON}


def test_dataset_rejects_bad_arguments(tmp_path: Path) -> None:
    ann = image_annotation(tmp_path, 32, 32, [[0, 0, 8, 8]], [CAT])
    with pytest.raises(ValueError, match="empty"):
        DetectionDataset([], 32, train=False)
    with pytest.raises(ValueError, match="1.5"):
        DetectionDataset([ann], 32, train=True, mosaic=1.5)
    with pytest.raises(ValueError, match="-4"):
        DetectionDataset([ann], -4, train=False)
    with pytest.raises(ValueError, match=r"shape \(K, 4\)"):
        Annotation(ann.image_path, 32, 32, torch.zeros(4), ann.labels, ann.difficult)


def test_detection_collate_stacks_images_and_lists_targets(tmp_path: Path) -> None:
    annotations = [
        image_annotation(tmp_path, 64, 48, [[4, 4, 40, 40]], [CAT]),
        image_annotation(tmp_path, 48, 64, [[10, 10, 30, 60], [0, 0, 48, 20]], [DOG, PERSON]),
    ]
    dataset = DetectionDataset(annotations, 32, train=False)

    images, targets = detection_collate([dataset[0], dataset[1]])

    assert images.shape == (2, 3, 32, 32)
    assert [t["labels"].tolist() for t in targets] == [[CAT], [DOG, PERSON]]
    assert [t["image_id"] for t in targets] == [0, 1]
    with pytest.raises(ValueError, match="empty"):
        detection_collate([])


# ------------------------------------------------------------------------------------------------
# Shared data
# ------------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_voc2007_subset_reads_whole_split_with_difficult_objects() -> None:
    root = SHARED / "datasets" / "voc2007_subset"
    if not root.is_dir():
        pytest.skip(f"shared data set not present at {root}")

    train = read_voc(root, "train")
    trainval = read_voc(root, "trainval")

    assert len(train) == 236
    assert len(trainval) == 295
    assert sum(int(a.difficult.sum()) for a in trainval) > 0
    for ann in trainval:
        assert (ann.boxes[:, 2:] > ann.boxes[:, :2]).all()
        assert (ann.boxes[:, 2] <= ann.width).all() and (ann.boxes[:, 3] <= ann.height).all()
