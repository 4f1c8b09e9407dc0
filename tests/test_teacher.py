"""Teacher-student training: labels of unlabelled images, their caches, the trainer's CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from builders import (
    SHARED,
    make_dog_voc,
    make_mirrored_voc,
    make_voc,
    unmirror_by_hand,
    write_image,
    write_tiny_yolo,
)

from model.checkpoint import load_checkpoint
from model.config import VOC_CLASSES
from model.darknet import load_darknet
from model.data import Annotation, DetectionDataset, target_grid, voc_class_names
from model.feature_cache import compute_features
from model.teacher import (
    EnsembleTeacher,
    Teacher,
    class_mapping,
    drop_foreign_boxes,
    fill_unlabelled_objects,
    foreign_objects,
    fuse_detections,
    label_images,
    list_unlabeled,
    teacher_annotation,
)
from model.train import get_args_parser, main


class CountingTeacher:
    """A teacher whose detections are fixed, counting how many images it was asked about."""

    sha256 = "ab" * 32
    input_size = (32, 32)
    class_names = list(VOC_CLASSES)
    gives_class_probs = False

    def __init__(self):
        self.seen = 0

    def detect(self, images: torch.Tensor, threshold: float) -> list[dict[str, torch.Tensor]]:
        self.seen += len(images)
        det = {
            "boxes": torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 0.9, 0.9]]),
            "scores": torch.tensor([0.9, 0.2]),
            "labels": torch.tensor([11, 14]),  # dog, person
        }
        if self.gives_class_probs:  # dog 0.9 = objectness 0.95 * P(dog) 0.947..., cat 0.5
            probs = torch.zeros(2, 20)
            probs[0, 11], probs[0, 7], probs[1, 14] = 0.9 / 0.95, 0.5, 0.4
            det["class_probs"] = probs
        return [det for _ in range(len(images))]


class SoftCountingTeacher(CountingTeacher):
    """The same detections, with each box's class probabilities, as a Darknet teacher gives."""

    gives_class_probs = True


def test_class_mapping_by_name_and_superset_check():
    assert class_mapping(["cat", "dog", "cow"], ["dog", "cat"]) == [1, 0, -1]
    with pytest.raises(ValueError, match=r"not a superset.*\['raccoon'\]"):
        class_mapping(list(VOC_CLASSES), ["dog", "raccoon"])


def test_list_unlabeled_skips_broken_files_and_keeps_a_voc_roots_train_split(tmp_path, caplog):
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    write_image(folder / "a.png", 40, 30, [])
    write_image(folder / "b.jpg", 40, 30, [])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    items = {f"v{k}": (50, 40, [("cat", 2, 2, 20, 20, 0)]) for k in range(3)}
    voc = make_voc(tmp_path / "voc", items)
    for k in range(3):
        write_image(voc / "JPEGImages" / f"v{k}.png", 50, 40, [])
    (voc / "ImageSets" / "Main" / "train.txt").write_text("v0\nv2\n")
    with caplog.at_level(logging.WARNING):
        paths = list_unlabeled([tmp_path / "photos", voc])
    assert [p.name for p in paths] == ["a.png", "b.jpg", "v0.png", "v2.png"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0].getMessage()


def test_labels_are_cached_by_teacher_and_image_content(tmp_path):
    images = []
    for k in range(3):
        path = tmp_path / f"i{k}.png"
        write_image(path, 40 + k, 30, [(k, 0, 10 + k, 10)])
        images.append(path)
    teacher = CountingTeacher()
    first = label_images(teacher, images, tmp_path / "cache", batch_size=2, progress=False)
    assert teacher.seen == 3 and first[images[1]]["size"] == [41, 30]
    again = label_images(teacher, images, tmp_path / "cache", batch_size=2, progress=False)
    assert teacher.seen == 3 and again == first
    write_image(images[0], 40, 30, [(5, 5, 20, 20)])  # new content: labelled again
    label_images(teacher, images, tmp_path / "cache", batch_size=2, progress=False)
    assert teacher.seen == 4


def test_soft_labels_are_cached_and_old_entries_without_them_relabelled(tmp_path):
    write_image(tmp_path / "a.png", 40, 30, [(0, 0, 10, 10)])
    images = [tmp_path / "a.png"]
    hard = CountingTeacher()
    label_images(hard, images, tmp_path / "cache", progress=False)
    soft = SoftCountingTeacher()  # same sha256: the hard entry lacks class_probs, so relabel
    (entry,) = label_images(soft, images, tmp_path / "cache", progress=False).values()
    assert soft.seen == 1
    assert entry["objectness"] == pytest.approx([0.95, 0.5], abs=1e-4)  # score / P(label)
    assert entry["class_probs"][0][7] == 0.5 and len(entry["class_probs"][1]) == 20
    label_images(soft, images, tmp_path / "cache", progress=False)
    label_images(hard, images, tmp_path / "cache", progress=False)
    assert soft.seen == 1 and hard.seen == 1  # cached for both from now on


def test_soft_teacher_annotation_maps_and_normalises_class_probabilities():
    # Teacher classes cat, dog, cow; the student has dog, cat: cow's probability is dropped.
    labels = {"boxes": [[0.1, 0.2, 0.5, 0.6]], "scores": [0.54], "labels": [1], "size": [10, 10],
              "class_probs": [[0.2, 0.6, 0.5]], "objectness": [0.9]}  # fmt: skip
    mapping = class_mapping(["cat", "dog", "cow"], ["dog", "cat"])
    ann = teacher_annotation(Path("x.jpg"), labels, mapping, 0.3, soft=True)
    torch.testing.assert_close(ann.class_probs, torch.tensor([[0.75, 0.25]]))  # 0.6, 0.2 / 0.8
    torch.testing.assert_close(ann.objectness, torch.tensor([0.9]))
    assert ann.labels.tolist() == [0]
    empty = teacher_annotation(Path("x.jpg"), labels, mapping, 0.6, soft=True)
    assert empty.class_probs.shape == (0, 2) and empty.objectness.shape == (0,)
    hard_only = {k: v for k, v in labels.items() if k not in ("class_probs", "objectness")}
    with pytest.raises(ValueError, match="no class probabilities"):
        teacher_annotation(Path("x.jpg"), hard_only, mapping, 0.3, soft=True)


def test_soft_fill_keeps_annotated_boxes_hard():
    labels = {"boxes": [[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]], "scores": [0.9, 0.6],
              "labels": [1, 0], "size": [100, 100], "class_probs": [[0.1, 0.9], [0.8, 0.2]],
              "objectness": [1.0, 0.75]}  # fmt: skip
    teacher_ann = teacher_annotation(Path("x"), labels, [0, 1], 0.3, soft=True)
    truth = teacher_annotation(
        Path("x"),
        {**labels, "boxes": [[0.1, 0.1, 0.5, 0.52]], "scores": [1.0], "labels": [0]},
        [0, 1],
        0.3,
    )
    filled = fill_unlabelled_objects(truth, teacher_ann)
    assert filled.labels.tolist() == [0, 0]
    torch.testing.assert_close(filled.class_probs, torch.tensor([[1.0, 0.0], [0.8, 0.2]]))
    torch.testing.assert_close(filled.objectness, torch.tensor([1.0, 0.75]))


def test_soft_targets_follow_their_boxes_through_the_augmentation(tmp_path):
    """A mirrored view moves each box's class distribution and objectness with it; a box
    pushed out of the image is dropped with them (torchvision's SanitizeBoundingBoxes)."""
    from torchvision.transforms import v2

    from model.data import target_grid

    write_image(tmp_path / "a.png", 64, 64, [(0, 0, 16, 32), (40, 40, 60, 60)])
    labels = {"boxes": [[0.0, 0.0, 0.25, 0.5], [0.625, 0.625, 0.9375, 0.9375]],
              "scores": [0.9, 0.8], "labels": [3, 5], "size": [64, 64],
              "class_probs": [[0.0] * 3 + [0.6, 0.4] + [0.0] * 15,
                              [0.0] * 5 + [1.0] + [0.0] * 14],
              "objectness": [0.9, 0.8]}  # fmt: skip
    ann = teacher_annotation(tmp_path / "a.png", labels, list(range(20)), 0.3, soft=True)
    mirror = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.ClampBoundingBoxes(),
                         v2.ToDtype(torch.float32, scale=True)])  # fmt: skip
    _, target = DetectionDataset([ann], 64, train=False, transform=mirror)[0]
    grid = target_grid(target, 2, 20)  # S = 2: box 0 (centre 8, 16) mirrors into cell (0, 1)
    torch.testing.assert_close(grid[0, 1, 3:5], torch.tensor([0.6, 0.4]))
    assert grid[0, 1, 20] == pytest.approx(0.9) and grid[1, 0, 20] == pytest.approx(0.8)
    assert grid[0, 0, 20] == 0 and grid[1, 0, 5] == 1
    torch.manual_seed(0)
    dropped = 0
    for _ in range(40):  # the training augmentation moves boxes up to 20 % out of the image
        _, target = DetectionDataset([ann], 32, train=True)[0]
        k = len(target["boxes"])
        dropped += k < 2
        assert target["class_probs"].shape == (k, 20) and target["objectness"].shape == (k,)
        for label, probs in zip(target["labels"], target["class_probs"], strict=True):
            assert probs[label] == probs.max()  # each distribution stayed with its box
    assert dropped  # ... and some views lost a box, with its soft targets


def test_hard_and_soft_annotations_do_not_mix_in_one_dataset():
    labels = {"boxes": [[0.1, 0.2, 0.5, 0.6]], "scores": [0.9], "labels": [0], "size": [10, 10],
              "class_probs": [[1.0, 0.0]], "objectness": [0.9]}  # fmt: skip
    soft = teacher_annotation(Path("x.jpg"), labels, [0, 1], 0.3, soft=True)
    hard = teacher_annotation(Path("y.jpg"), labels, [0, 1], 0.3)
    with pytest.raises(ValueError, match="soft targets or none"):
        DetectionDataset([soft, hard], 64, train=True)
    assert DetectionDataset([soft, hard.with_soft_targets(2)], 64, train=True)


def test_teacher_annotation_scales_to_pixels_and_thresholds():
    labels = {"boxes": [[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 0.9, 0.9]], "scores": [0.9, 0.2],
              "labels": [11, 14], "size": [200, 100]}  # fmt: skip
    mapping = class_mapping(VOC_CLASSES, VOC_CLASSES)
    ann = teacher_annotation(Path("x.jpg"), labels, mapping, threshold=0.3)
    torch.testing.assert_close(ann.boxes, torch.tensor([[20.0, 20.0, 100.0, 60.0]]))
    assert ann.labels.tolist() == [11] and not ann.difficult.any()
    empty = teacher_annotation(Path("x.jpg"), labels, mapping, threshold=0.95)
    assert empty.boxes.shape == (0, 4)  # a negative image, kept


def test_fill_adds_only_teacher_boxes_that_overlap_no_annotation():
    labels = {"boxes": [[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]], "scores": [0.9, 0.9],
              "labels": [11, 14], "size": [100, 100]}  # fmt: skip
    teacher_ann = teacher_annotation(Path("x"), labels, list(range(20)), 0.3)
    annotated = {**labels, "boxes": [[0.12, 0.1, 0.5, 0.52]], "scores": [1.0], "labels": [7]}
    truth = teacher_annotation(Path("x"), annotated, list(range(20)), 0.3)
    filled = fill_unlabelled_objects(truth, teacher_ann)
    assert filled.labels.tolist() == [7, 14]  # the overlapping dog is the annotated cat


def test_teacher_boxes_on_objects_annotated_as_no_student_class_are_dropped(tmp_path):
    """A raccoon that a teacher calls a dog is known not to be a dog: that box goes, the
    teacher's boxes elsewhere stay (with their soft targets), and plain folders give nothing."""
    zoo = make_voc(tmp_path / "zoo", {
        "z0": (100, 80, [("raccoon", 11, 11, 50, 50, 0), ("dog", 61, 11, 90, 40, 0)]),
        "z1": (100, 80, [("dog", 11, 11, 50, 50, 0)]),
        "z2": (100, 80, [("kangaroo", 1, 1, 100, 80, 0), ("raccoon", 5, 5, 20, 20, 0)]),
    })  # fmt: skip
    plain = tmp_path / "plain"
    write_image(plain / "p.png", 40, 30, [])
    assert voc_class_names(zoo, "train") == ["dog", "kangaroo", "raccoon"]
    foreign = foreign_objects([plain, zoo], "train", VOC_CLASSES)
    assert sorted(p.name for p in foreign) == ["z0.png", "z2.png"]
    # VOC's 1-based xmin 11 is the pixel edge 10.
    torch.testing.assert_close(
        foreign[zoo / "JPEGImages" / "z0.png"], torch.tensor([[10.0, 10, 50, 50]])
    )
    assert len(foreign[zoo / "JPEGImages" / "z2.png"]) == 2

    # Teacher boxes on z0, against the raccoon (10,10)-(50,50), area 1,600: one on it (IoU
    # 1,520 / 1,600 = 0.95), one on the dog (0), its top half (800 / 1,600 = 0.5, dropped: the
    # threshold is inclusive), a box half over it (IoU 800 / 2,400 = 0.33; half its own area
    # inside, under 0.7: kept), a part of it (20,20)-(40,40) (IoU 400 / 1,600 = 0.25, but all
    # of it inside: dropped), a box 0.875 inside (15,10)-(55,50) (IoU 1,400 / 1,800 = 0.78:
    # dropped either way) and one 0.6 inside (26,10)-(66,50) (IoU 960 / 2,240 = 0.43: kept).
    boxes = torch.tensor(
        [[10.0, 12, 50, 50], [60, 10, 90, 40], [10, 10, 50, 30], [30, 10, 70, 50],
         [20, 20, 40, 40], [15, 10, 55, 50], [26, 10, 66, 50]]
    )  # fmt: skip
    labels = torch.tensor([11, 11, 7, 11, 12, 9, 16])
    probs = torch.eye(20)[labels]
    teacher_ann = Annotation(
        image_path=zoo / "JPEGImages" / "z0.png", width=100, height=80, boxes=boxes,
        labels=labels, difficult=torch.zeros(7, dtype=torch.bool),
        class_probs=probs, objectness=torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]),
    )  # fmt: skip
    kept = drop_foreign_boxes(teacher_ann, foreign[teacher_ann.image_path])
    torch.testing.assert_close(kept.boxes, boxes[[1, 3, 6]])
    assert kept.labels.tolist() == [11, 11, 16]
    torch.testing.assert_close(kept.class_probs, probs[[1, 3, 6]])
    torch.testing.assert_close(kept.objectness, torch.tensor([0.8, 0.6, 0.3]))
    assert drop_foreign_boxes(teacher_ann, None) is teacher_ann


@pytest.mark.shared
@pytest.mark.skipif(
    not (SHARED / "datasets" / "raccoon").is_dir(), reason="needs ../shared/datasets/raccoon"
)
def test_every_annotated_raccoon_is_a_foreign_object():
    import xml.etree.ElementTree as ET

    root = SHARED / "datasets" / "raccoon"
    foreign = foreign_objects([root], "train", VOC_CLASSES)
    ids = (root / "ImageSets" / "Main" / "train.txt").read_text().split()
    objects = sum(
        len(ET.parse(root / "Annotations" / f"{i}.xml").getroot().findall("object")) for i in ids
    )
    assert len(foreign) == len(ids) and sum(len(b) for b in foreign.values()) == objects


def test_negative_images_give_an_empty_target(tmp_path):
    write_image(tmp_path / "n.png", 64, 64, [])
    labels = {"boxes": [], "scores": [], "labels": [], "size": [64, 64]}
    ann = teacher_annotation(tmp_path / "n.png", labels, list(range(20)), 0.3)
    image, target = DetectionDataset([ann], 64, train=True)[0]
    assert image.shape == (3, 64, 64) and target["boxes"].shape == (0, 4)


def test_darknet_teacher_loads_and_detects(tmp_path):
    cfg, weights = write_tiny_yolo(tmp_path)
    teacher = Teacher(cfg, weights)
    assert teacher.input_size == (64, 64) and len(teacher.sha256) == 64
    (det,) = teacher.detect(torch.rand(1, 3, 64, 64), threshold=0.0)
    assert det["boxes"].shape[1] == 4 and (det["scores"][:-1] >= det["scores"][1:]).all()
    with pytest.raises(ValueError, match="3 names were given"):
        Teacher(cfg, weights, ["a", "b", "c"])


def test_cached_features_match_the_live_stem_and_views_mirror_boxes(tmp_path):
    from model.network import YOLOv1
    from model.train import backbone_arch

    cfg, weights = write_tiny_yolo(tmp_path)
    model = YOLOv1(backbone_arch(cfg, 4), 20, 2, 64, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    model.stem.net.load_state_dict(load_darknet(cfg, weights, upto=4).state_dict())
    write_image(tmp_path / "a.png", 64, 64, [(0, 0, 16, 32)])
    labels = {"boxes": [[0.0, 0.0, 0.25, 0.5]], "scores": [0.9], "labels": [3], "size": [64, 64]}
    ann = teacher_annotation(tmp_path / "a.png", labels, list(range(20)), 0.3)
    features, targets, cells = compute_features(model, [ann], 3, views=2, seed=0, workers=0,
                                                progress=False)  # fmt: skip
    assert features.shape == (2, 8, 4, 4) and targets.shape == (2, 2, 2, 25)
    # The plain view: the cached features continue to the same grid as the live network.
    image, _ = DetectionDataset([ann], 64, train=False)[0]
    with torch.no_grad():
        live = model(image[None])
        cached = model.forward_from(features[:1].float(), 3)
    torch.testing.assert_close(cached, live, atol=2e-2, rtol=1e-2)  # float16 features
    # The mirrored view's box is the plain one's mirror image: cell (0, 0) -> cell (0, 1).
    assert targets[0, 0, 0, 20] == 1 and targets[1, 0, 1, 20] == 1 and targets[1, 0, 0, 20] == 0
    # The box (0, 0)-(0.25, 0.5) holds the centre (0.25, 0.25) of cell (0, 0), and its mirror
    # image (0.75, 0)-(1, 0.5) that of cell (0, 1): each view's map of box classes.
    assert cells.tolist() == [[[3, -1], [-1, -1]], [[-1, 3], [-1, -1]]]


@pytest.mark.slow
def test_train_with_teacher_backbone_and_cached_features(tmp_path):
    cfg, weights = write_tiny_yolo(tmp_path / "teacher")
    voc = make_dog_voc(tmp_path / "voc")
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for k in range(3):
        write_image(unlabeled / f"u{k}.png", 80, 60, [(10, 10, 30, 30)])
    out = tmp_path / "run" / "w.safetensors"
    args = get_args_parser().parse_args(
        ["--data", str(voc), "--img-size", "64", "--epochs", "2", "--batch-size", "4",
         "--optimizer", "adamw", "--lr", "1e-3", "--workers", "0", "--no-progress",
         "--backbone", str(cfg), str(weights), "--backbone-layer", "4",
         "--teacher", str(cfg), str(weights), "--teacher-threshold", "0.0",
         "--unlabeled", str(unlabeled), "--cache-views", "3", "--train-from-layer", "4",
         "--teacher-fill", "--soft-targets",
         "--freeze-backbone-epochs", "1", "--out", str(out)]
    )  # fmt: skip
    best = main(args)
    model, meta = load_checkpoint(best)
    assert meta["grid_size"] == 2 and meta["architecture"]["darknet_cfg"].startswith("[net]")
    assert meta["training"]["teacher"]["unlabeled_images"] == 3
    assert meta["training"]["teacher"]["soft_targets"] is True
    assert meta["input"]["mean"] == [0.0, 0.0, 0.0]
    # The pretrained layers before --train-from-layer are the teacher's, untouched.
    teacher = load_darknet(cfg, weights)
    torch.testing.assert_close(model.stem.net.layers[0].conv.weight, teacher.layers[0].conv.weight)
    assert len(list((tmp_path / "run" / "features").glob("features-*.safetensors"))) == 1

    # Continuing from the checkpoint alone: its metadata gives the architecture (no --backbone).
    again = get_args_parser().parse_args(
        ["--data", str(voc), "--img-size", "64", "--epochs", "1", "--batch-size", "4",
         "--optimizer", "adamw", "--lr", "1e-4", "--workers", "0", "--no-progress",
         "--init", str(best), "--cache-views", "2", "--train-from-layer", "4",
         "--out", str(tmp_path / "next" / "w.safetensors")]
    )  # fmt: skip
    _, meta2 = load_checkpoint(main(again))
    assert meta2["architecture"] == meta["architecture"]


def test_one_of_our_checkpoints_can_teach(tmp_path, weights):
    from model.postprocess import postprocess
    from model.teacher import load_teacher

    teacher = load_teacher([weights])
    assert teacher.class_names == list(VOC_CLASSES) and teacher.input_size == (128, 128)
    write_image(tmp_path / "a.png", 128, 128, [(10, 10, 90, 90)])
    labels = label_images(teacher, [tmp_path / "a.png"], tmp_path / "cache", progress=False)
    image, _ = DetectionDataset([teacher_annotation(tmp_path / "a.png", {
        "boxes": [], "scores": [], "labels": [], "size": [128, 128]}, list(range(20)), 0.3)],
        128, train=False)[0]  # fmt: skip
    model, _ = load_checkpoint(weights)
    with torch.no_grad():
        (expected,) = postprocess(model(image[None]), 2, 20, 0.05, 0.45)
    assert labels[tmp_path / "a.png"]["labels"] == expected["labels"].tolist()


def test_a_valid_head_conv_keeps_the_grid_on_a_larger_input(tmp_path):
    """--valid-head-conv: the 3x3 head conv without padding turns the stem's (S+2)x(S+2) map
    into the SxS grid, and the checkpoint says so (it reloads with that grid)."""
    from model.checkpoint import save_checkpoint
    from model.network import YOLOv1
    from model.train import backbone_arch

    cfg, _ = write_tiny_yolo(tmp_path)
    same = YOLOv1(backbone_arch(cfg, 4), 20, 2, 128, mean=(0, 0, 0), std=(1, 1, 1))
    valid = YOLOv1(backbone_arch(cfg, 4, valid_head=True), 20, 2, 128, mean=(0, 0, 0),
                   std=(1, 1, 1)).eval()  # fmt: skip
    assert same.grid_size == 4 and valid.grid_size == 2  # 128 / 32 = 4, less 2
    with torch.no_grad():
        assert valid(torch.rand(1, 3, 128, 128)).shape == (1, 2, 2, 30)
    five = YOLOv1(backbone_arch(cfg, 4, valid_head=True, kernel=5), 20, 2, 192,
                  mean=(0, 0, 0), std=(1, 1, 1))  # fmt: skip
    assert five.grid_size == 2  # 192 / 32 = 6, less 4
    with pytest.raises(ValueError, match="odd unless the conv is valid"):
        backbone_arch(cfg, 4, kernel=4)
    path = save_checkpoint(tmp_path / "v.safetensors", valid, {"class_names": list(VOC_CLASSES)})
    model, meta = load_checkpoint(path)
    assert model.grid_size == meta["grid_size"] == 2
    with torch.no_grad():
        x = torch.rand(2, 3, 128, 128)
        torch.testing.assert_close(model(x), valid(x))


def test_a_head_without_a_hidden_layer_is_darknets_yolov1_head(tmp_path):
    """--head-hidden 0 --head-filters F: the head conv's F x S x S map straight into the
    output layer (Darknet's yolov1.cfg has no hidden connected layer), checked against the
    layers applied by hand; it round-trips through a checkpoint; bad sizes are refused."""
    from model.checkpoint import save_checkpoint
    from model.network import YOLOv1
    from model.train import backbone_arch

    cfg, _ = write_tiny_yolo(tmp_path)
    arch = backbone_arch(cfg, 4, dropout=0.5, valid_head=True, hidden=0, filters=8)
    model = YOLOv1(arch, 20, 2, 128, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    (linear,) = [m for m in model.fcs if isinstance(m, torch.nn.Linear)]
    assert (linear.in_features, linear.out_features) == (8 * 2 * 2, 2 * 2 * 30)
    x = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        conv = model.darknet(model.stem(x))
        assert conv.shape == (3, 8, 2, 2)
        by_hand = (conv.reshape(3, -1) @ linear.weight.T + linear.bias).reshape(3, 2, 2, 30)
        torch.testing.assert_close(model(x), by_hand)
    path = save_checkpoint(tmp_path / "h.safetensors", model, {"class_names": list(VOC_CLASSES)})
    loaded, _ = load_checkpoint(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    for bad in ({"hidden": -1}, {"filters": 0}):
        with pytest.raises(ValueError, match="head: "):
            backbone_arch(cfg, 4, **bad)


def test_soft_targets_need_a_darknet_teacher(tmp_path, weights, capsys):
    from model.train import cli

    voc = make_voc(tmp_path / "voc", {"a": (64, 64, [("dog", 5, 5, 40, 50, 0)])})
    (voc / "ImageSets" / "Main" / "val.txt").write_text("a\n")
    base = ["--data", str(voc), "--img-size", "64", "--epochs", "1", "--workers", "0",
            "--no-progress", "--out", str(tmp_path / "w.safetensors")]  # fmt: skip
    for extra, message in (
        (["--teacher", str(weights), "--soft-targets"], "needs a Darknet teacher"),
        (["--soft-targets"], "need a --teacher"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli(base + extra)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "w.safetensors").exists()


def test_cached_features_serve_new_labels_of_the_same_images(tmp_path):
    """The augmentation draws without looking at the boxes: targets-only replays the views."""
    from model.feature_cache import load_or_compute
    from model.network import YOLOv1
    from model.train import backbone_arch

    cfg, weights = write_tiny_yolo(tmp_path)
    model = YOLOv1(backbone_arch(cfg, 4), 20, 2, 64, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    anns = []
    for k in range(3):
        write_image(tmp_path / f"a{k}.png", 64, 64, [(4 * k, 0, 30, 40)])
        labels = {"boxes": [[0.05 * k, 0.0, 0.5, 0.6]], "scores": [0.9], "labels": [k],
                  "size": [64, 64]}  # fmt: skip
        anns.append(teacher_annotation(tmp_path / f"a{k}.png", labels, list(range(20)), 0.3))
    kw = {"workers": 0, "progress": False}
    features, targets, cells = load_or_compute(tmp_path / "c", model, anns, 3, 4, 0, **kw)
    again, replayed, replayed_cells = load_or_compute(tmp_path / "c", model, anns, 3, 4, 0, **kw)
    torch.testing.assert_close(again, features)
    torch.testing.assert_close(replayed, targets)  # the augmented views drew the same way
    assert torch.equal(replayed_cells, cells) and (cells >= 0).any()
    relabelled = [teacher_annotation(a.image_path, {"boxes": [], "scores": [], "labels": [],
                                                     "size": [64, 64]}, list(range(20)), 0.3)
                  for a in anns]  # fmt: skip
    reused, empty, no_cells = load_or_compute(tmp_path / "c", model, relabelled, 3, 4, 0, **kw)
    torch.testing.assert_close(reused, features)
    assert empty[..., 20].sum() == 0 and targets[..., 20].sum() > 0 and (no_cells == -1).all()
    assert len(list((tmp_path / "c").glob("features-*"))) == 1


def test_mosaic_views_are_a_second_cache_of_tiled_views(tmp_path):
    """--cache-mosaic-views: four images a view, cached apart from the plain views."""
    from model.feature_cache import load_or_compute
    from model.network import YOLOv1
    from model.train import backbone_arch

    cfg, weights = write_tiny_yolo(tmp_path)
    model = YOLOv1(backbone_arch(cfg, 4), 20, 2, 64, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    model.stem.net.load_state_dict(load_darknet(cfg, weights, upto=4).state_dict())
    anns = []
    for k in range(3):  # one small object each, of class k
        write_image(tmp_path / f"m{k}.png", 64, 64, [(20, 20, 44, 44)])
        labels = {"boxes": [[0.3, 0.3, 0.7, 0.7]], "scores": [0.9], "labels": [k],
                  "size": [64, 64]}  # fmt: skip
        anns.append(teacher_annotation(tmp_path / f"m{k}.png", labels, list(range(20)), 0.3))
    kw = {"workers": 0, "progress": False}
    plain, plain_targets, _ = load_or_compute(tmp_path / "c", model, anns, 3, 2, 0, **kw)
    features, targets, _ = load_or_compute(tmp_path / "c", model, anns, 3, 2, 0, mosaic=True, **kw)
    assert features.shape == plain.shape == (6, 8, 4, 4)
    assert len(list((tmp_path / "c").glob("features-*"))) == 2  # the plain file is untouched
    again = load_or_compute(tmp_path / "c", model, anns, 3, 2, 0, **kw).features
    torch.testing.assert_close(again, plain)
    # A plain view holds its one object; a mosaic view up to four, from the three images only.
    assert (plain_targets[..., 20].sum((1, 2)) == 1).all()
    assert targets[..., 20].sum() > plain_targets[..., 20].sum()
    assert set(targets[..., :20].argmax(-1)[targets[..., 20] == 1].tolist()) <= {0, 1, 2}
    # The first mosaic view is the training mosaic the same seed draws, through the live stem.
    torch.manual_seed(0)
    image, target = DetectionDataset(anns, 64, train=True, mosaic=1.0)[0]
    with torch.no_grad():
        cached = model.forward_from(features[:1].float(), 3)
        torch.testing.assert_close(cached, model(image[None]), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(targets[0], target_grid(target, 2, 20))


def test_view_options_that_contradict_are_refused_before_labelling(tmp_path, capsys):
    from model.train import cli

    voc = make_voc(tmp_path / "voc", {"a": (64, 64, [("dog", 5, 5, 40, 50, 0)])})
    base = ["--data", str(voc), "--img-size", "64", "--epochs", "1", "--workers", "0",
            "--no-progress", "--out", str(tmp_path / "w.safetensors")]  # fmt: skip
    for extra, message in (
        (["--cache-views", "3", "--mosaic", "0.5"], "use --cache-mosaic-views"),
        (["--cache-mosaic-views", "2"], "give both"),
        (["--cache-views", "-1"], "must be >= 0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli(base + extra)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "w.safetensors").exists()


def detections(boxes, probs, objectness, labels=None) -> dict[str, torch.Tensor]:
    """A Darknet detector's output: each box labelled with its most probable class."""
    probs = torch.as_tensor(probs, dtype=torch.float32)
    objectness = torch.tensor(objectness, dtype=torch.float32)
    labels = probs.argmax(1) if labels is None else torch.tensor(labels)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": objectness * probs.gather(1, labels[:, None])[:, 0],
        "labels": labels,
        "class_probs": probs,
        "objectness": objectness,
    }


def test_fusion_hand_worked():
    # Member A: one object, class 0 (score 0.8), and the same box again as class 1 (score 0.08,
    # kept by its class-wise NMS). Member B: the object (IoU 100/120 with A's) as class 1
    # (score 0.6 x 0.9 = 0.54) and a second object only it sees (0.5 x 0.8 = 0.4).
    a = detections([[0, 0, 10, 10], [0, 0, 10, 10]], [[1.0, 0.1], [1.0, 0.1]], [0.8, 0.8], [0, 1])
    b = detections([[0, 0, 10, 12], [20, 20, 30, 30]], [[0.2, 0.9], [0.0, 0.8]], [0.6, 0.5])
    fused = fuse_detections([a, b], threshold=0.1, iou_threshold=0.5)
    # Object 1: box (0.8 x A + 0.54 x B) / 1.34; objectness (0.8 + 0.6) / 2 = 0.7; class
    # distribution (0.6, 0.5): class 0 at 0.42, class 1 at 0.35. Object 2: objectness 0.5 / 2,
    # distribution (0, 0.8): class 1 at 0.2; its class 0 (0.0) is under the threshold.
    y2 = (0.8 * 10 + 0.54 * 12) / 1.34
    torch.testing.assert_close(
        fused["boxes"], torch.tensor([[0, 0, 10, y2], [0, 0, 10, y2], [20, 20, 30, 30.0]])
    )
    torch.testing.assert_close(fused["scores"], torch.tensor([0.42, 0.35, 0.2]))
    assert fused["labels"].tolist() == [0, 1, 1]
    torch.testing.assert_close(fused["objectness"], torch.tensor([0.7, 0.7, 0.25]))
    torch.testing.assert_close(fused["class_probs"][2], torch.tensor([0.0, 0.8]))


def test_two_teachers_outvote_the_third():
    # The case of horses.jpg: one teacher calls the animal a cow, two call it a horse.
    cow, horse = VOC_CLASSES.index("cow"), VOC_CLASSES.index("horse")
    votes = []
    for p_cow, p_horse, box in ((0.99, 0.01, [10, 10, 50, 40]), (0.1, 0.9, [12, 10, 52, 41]),
                                (0.3, 0.7, [10, 12, 50, 40])):  # fmt: skip
        probs = torch.zeros(1, 20)
        probs[0, cow], probs[0, horse] = p_cow, p_horse
        votes.append(detections([box], probs.tolist(), [0.9]))
    fused = fuse_detections(votes, threshold=0.3)
    assert fused["labels"].tolist() == [horse, cow]
    torch.testing.assert_close(fused["scores"], torch.tensor([0.9 * 1.61 / 3, 0.9 * 1.39 / 3]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_member_with_separate_boxes_fuses_to_itself(seed):
    g = torch.Generator().manual_seed(seed)
    corners = torch.arange(6.0)[:, None] * 20 + torch.tensor([0.0, 0.0, 10.0, 10.0])  # apart
    probs = torch.rand(6, 5, generator=g) * 0.2
    probs[torch.arange(6), torch.randint(0, 5, (6,), generator=g)] = 0.9  # one class stands out
    det = detections(corners.tolist(), probs.tolist(), torch.rand(6, generator=g).tolist())
    fused = fuse_detections([det], threshold=0.2)
    keep = det["scores"] > 0.2
    order = det["scores"][keep].argsort(descending=True)
    for key in ("boxes", "scores", "labels", "class_probs", "objectness"):
        torch.testing.assert_close(fused[key], det[key][keep][order])


def test_fusion_of_nothing_is_typed_empty():
    empty = detections([], torch.zeros(0, 20), [])
    fused = fuse_detections([empty, empty], threshold=0.1)
    assert fused["boxes"].shape == (0, 4) and fused["class_probs"].shape == (0, 20)
    assert fused["labels"].dtype == torch.int64 and fused["scores"].shape == (0,)


class VotingTeacher(SoftCountingTeacher):
    """One box whose class distribution is given; a teacher of its own (sha256)."""

    def __init__(self, name: str, probs: dict[str, float]):
        super().__init__()
        self.sha256 = name * 32
        self.probs = torch.zeros(1, 20)
        for cls, p in probs.items():
            self.probs[0, VOC_CLASSES.index(cls)] = p

    def detect(self, images: torch.Tensor, threshold: float) -> list[dict[str, torch.Tensor]]:
        self.seen += len(images)
        label = self.probs.argmax(1)
        det = {"boxes": torch.tensor([[0.1, 0.1, 0.6, 0.7]]), "labels": label,
               "scores": 0.8 * self.probs[0, label], "class_probs": self.probs}  # fmt: skip
        return [det for _ in range(len(images))]


def test_an_ensemble_labels_with_each_members_cache(tmp_path):
    write_image(tmp_path / "a.png", 40, 30, [(0, 0, 10, 10)])
    images = [tmp_path / "a.png"]
    xl = VotingTeacher("a1", {"cow": 0.9, "horse": 0.1})
    ensemble = EnsembleTeacher([xl, VotingTeacher("b2", {"horse": 0.8, "cow": 0.2})])
    (entry,) = label_images(ensemble, images, tmp_path / "cache", progress=False).values()
    # horse (0.1 + 0.8) / 2 = 0.45 against cow 0.55: the ensemble keeps both, cow first.
    assert [VOC_CLASSES[k] for k in entry["labels"]] == ["cow", "horse"]
    assert entry["scores"] == pytest.approx([0.8 * 0.55, 0.8 * 0.45], abs=1e-4)
    assert entry["objectness"] == pytest.approx([0.8, 0.8], abs=1e-4) and entry["size"] == [40, 30]
    nano = VotingTeacher("c3", {"horse": 0.9})
    third = EnsembleTeacher([xl, ensemble.members[1], nano])
    (entry,) = label_images(third, images, tmp_path / "cache", progress=False).values()
    assert VOC_CLASSES[entry["labels"][0]] == "horse"  # outvoted
    assert (xl.seen, ensemble.members[1].seen, nano.seen) == (1, 1, 1)  # each labelled once


def test_an_ensemble_takes_darknet_teachers_that_agree_on_class_names(tmp_path):
    one = VotingTeacher("a1", {"dog": 1.0})
    with pytest.raises(ValueError, match="two teachers or more"):
        EnsembleTeacher([one])
    with pytest.raises(ValueError, match="Darknet teachers"):
        EnsembleTeacher([one, CountingTeacher()])
    other = VotingTeacher("b2", {"dog": 1.0})
    other.class_names = list(reversed(VOC_CLASSES))
    with pytest.raises(ValueError, match="name their classes differently"):
        EnsembleTeacher([one, other])


def test_an_ensemble_of_darknet_detectors_detects(tmp_path):
    members = [Teacher(*write_tiny_yolo(tmp_path / f"t{seed}", seed)) for seed in (0, 1)]
    ensemble = EnsembleTeacher(members)
    assert ensemble.sha256 != members[0].sha256 and ensemble.describe()["members"][1]["kind"]
    images = torch.rand(2, 3, 64, 64)
    fused = ensemble.detect(images, threshold=0.05)
    for n in range(2):  # the same as fusing the members' own detections
        own = [m.detect(images[n : n + 1], 0.05)[0] for m in members]
        for det in own:
            det["objectness"] = det["scores"] / det["class_probs"].gather(
                1, det["labels"][:, None])[:, 0]  # fmt: skip
        expected = fuse_detections(own, 0.05)
        torch.testing.assert_close(fused[n]["scores"], expected["scores"])
        assert (fused[n]["scores"] > 0.05).all()


@pytest.mark.shared
@pytest.mark.skipif(not (SHARED / "teachers").is_dir(), reason="needs ../shared/teachers")
def test_the_shared_teachers_vote_better_than_the_best_of_them():
    from model.data import read_datasets
    from model.evaluate import score
    from model.teacher import load_teachers, predict_teacher

    T = SHARED / "teachers"
    specs = [
        [T / "yolo-fastest-xl-voc" / f"yolo-fastest-xl.{ext}" for ext in ("cfg", "weights")],
        [T / "mobilenetv2-yolov3-nano-voc" / f"MobileNetV2-YOLOv3-Nano-voc.{ext}"
         for ext in ("cfg", "weights")],
        [T / "yolo-fastest-voc" / f"yolo-fastest.{ext}" for ext in ("cfg", "weights")],
    ]  # fmt: skip
    annotations = read_datasets([SHARED / "datasets" / "voc2007_subset"], "voc", "val", VOC_CLASSES)

    def val_map(teacher) -> float:
        return score(predict_teacher(teacher, annotations), annotations, 20)["map50_11point"]

    best_member = val_map(load_teachers(specs[:1]))  # Yolo-Fastest-XL, the best alone
    assert val_map(load_teachers(specs)) > best_member + 0.02


def test_eval_scores_the_vote_of_repeated_teachers(tmp_path, capsys):
    from model.evaluate import get_args_parser as eval_parser
    from model.evaluate import main as eval_main

    voc = make_voc(tmp_path / "voc", {"a": (64, 64, [("dog", 5, 5, 40, 50, 0)])}, split="val")
    specs = [write_tiny_yolo(tmp_path / f"t{seed}", seed) for seed in (0, 1)]
    argv = ["--data", str(voc), "--split", "val"]
    for cfg, weights in specs:
        argv += ["--teacher", str(cfg), str(weights)]
    result = eval_main(eval_parser().parse_args(argv))
    members = result["teacher"]["members"]
    assert result["teacher"]["kind"] == "ensemble" and len(members) == 2
    assert {m["sha256"] for m in members} == {Teacher(*spec).sha256 for spec in specs}
    assert 0.0 <= result["map50_11point"] <= 1.0 and "mAP@0.5" in capsys.readouterr().out


def test_teacher_eval_mirror_is_the_mirrored_files_detections_mapped_back(tmp_path):
    from model.data import read_datasets
    from model.teacher import predict_teacher

    plain, mirrored = make_mirrored_voc(tmp_path, [(90, 60), (70, 100)], seed=1)
    teacher = Teacher(*write_tiny_yolo(tmp_path / "t", 0))
    on_plain = read_datasets([plain], "voc", "val", VOC_CLASSES)
    got = predict_teacher(teacher, on_plain, mirror=True)
    ref = predict_teacher(teacher, read_datasets([mirrored], "voc", "val", VOC_CLASSES))
    assert sum(len(d["scores"]) for d in got) > 0
    for g, r, ann in zip(got, ref, on_plain, strict=True):
        torch.testing.assert_close(g["scores"], r["scores"])
        torch.testing.assert_close(g["boxes"], unmirror_by_hand(r["boxes"], ann.width))
