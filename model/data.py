"""Detection data: Pascal VOC and YOLO readers into one ``Annotation`` record, and the Dataset.

Box formats, end to end:
- on disk, VOC ``bndbox`` is 1-based and inclusive (``xmin=1`` is the first pixel column);
  YOLO label lines are ``class cx cy w h``, normalised to the image size;
- an ``Annotation`` holds xyxy boxes in pixels of the EXIF-rotated image: ``x1, y1`` is the
  top-left pixel edge, ``x2, y2`` one past the last pixel (``x2 - x1`` is the width in pixels);
- ``DetectionDataset`` returns xyxy boxes normalised to [0, 1] of the network input.

Broken items (unparsable XML, missing or unreadable image, unknown class, box outside the image
or degenerate) are dropped with a ``logger.warning`` naming the file and the problem; an image
left with no valid object is dropped too, since a YOLOv1 training list should hold objects.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from model.boxes import box_cells, encode_targets, hard_targets
from model.config import VOC_CLASSES
from model.files import IMAGE_EXTENSIONS, voc_split_file, voc_split_ids

logger = logging.getLogger(__name__)

# 0-based VOC exporters (xmin=0) and rounded YOLO floats overshoot the border by up to a pixel:
# such boxes are clipped, anything further out is an annotation error and is dropped.
BOX_TOLERANCE_PX = 1.0
# After augmentation a box thinner than this (in network-input pixels) shows no visible object.
MIN_BOX_SIZE_PX = 3.0
# The paper jitters exposure and saturation only; darknet's yolov1.cfg adds hue=.1. Keep it small.
HUE_JITTER = 0.05

_EXIF_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # transpose / rotate 90 / transverse / rotate 270


@dataclass(eq=False)  # tensors have no single truth value, so field-wise == would raise
class Annotation:
    """One image and its objects.

    ``boxes``: (K, 4) float32 xyxy in pixels of the EXIF-rotated ``width`` x ``height`` image.
    ``labels``: (K,) int64 indices into the class-name list the reader was given.
    ``difficult``: (K,) bool, VOC's ``<difficult>`` flag (all False for YOLO data).
    ``class_probs``, ``objectness``: soft targets, or None (hard: one-hot ``labels``, certain
    objects). (K, C) float32, each row a class distribution, and (K,) float32 in [0, 1], the
    probability that the box is an object; a teacher's boxes carry them (``--soft-targets``).
    """

    image_path: Path
    width: int
    height: int
    boxes: torch.Tensor
    labels: torch.Tensor
    difficult: torch.Tensor
    class_probs: torch.Tensor | None = None
    objectness: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"image size must be positive, got {self.width}x{self.height}")
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (K, 4), got {tuple(self.boxes.shape)}")
        k = self.boxes.shape[0]
        if self.labels.shape != (k,) or self.difficult.shape != (k,):
            raise ValueError(
                f"labels and difficult must have shape ({k},), got "
                f"{tuple(self.labels.shape)} and {tuple(self.difficult.shape)}"
            )
        if (self.class_probs is None) != (self.objectness is None):
            raise ValueError("class_probs and objectness go together: give both or neither")
        if self.class_probs is not None and (
            self.class_probs.ndim != 2 or self.class_probs.shape[0] != k
            or self.objectness.shape != (k,)
        ):  # fmt: skip
            raise ValueError(
                f"class_probs must have shape ({k}, C) and objectness ({k},), got "
                f"{tuple(self.class_probs.shape)} and {tuple(self.objectness.shape)}"
            )

    @property
    def soft(self) -> bool:
        return self.class_probs is not None

    def select(self, keep: torch.Tensor) -> Annotation:
        """This annotation with only the boxes ``keep`` (a (K,) bool mask or indices) selects."""
        soft = {}
        if self.soft:
            soft = {"class_probs": self.class_probs[keep], "objectness": self.objectness[keep]}
        return replace(
            self, boxes=self.boxes[keep], labels=self.labels[keep],
            difficult=self.difficult[keep], **soft,
        )  # fmt: skip

    def with_soft_targets(self, num_classes: int) -> Annotation:
        """This annotation with explicit soft targets (hard ones: one-hot classes, certain)."""
        if self.soft:
            return self
        class_probs, objectness = hard_targets(self.labels, num_classes)
        return replace(self, class_probs=class_probs, objectness=objectness)


class _DropItem(Exception):
    """An image or object that is left out with a warning; the message says why."""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def read_image_size(path: Path) -> tuple[int, int]:
    """Return ``(width, height)`` of the image as decoded after EXIF rotation, from its header.

    Raises ``OSError`` (or PIL's subclasses of it) when the file is missing or not an image.
    """
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height


def load_image_rgb(path: Path) -> Image.Image:
    """Decode ``path`` as an RGB PIL image, rotated upright by its EXIF orientation tag."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def _class_index(class_names: Sequence[str]) -> dict[str, int]:
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(f"class_names must be a non-empty sequence of names, got {class_names!r}")
    index = {name: i for i, name in enumerate(class_names)}
    if len(index) != len(class_names):
        raise ValueError(f"class_names has duplicates: {list(class_names)}")
    return index


def _validated_box_xyxy(
    box: tuple[float, float, float, float], width: int, height: int
) -> tuple[float, float, float, float]:
    """Clip a pixel xyxy box overshooting the image by at most ``BOX_TOLERANCE_PX``.

    Raises ``_DropItem`` for a non-finite, out-of-image or degenerate (zero-area) box.
    """
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box):
        raise _DropItem(f"non-finite box {box}")
    tol = BOX_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise _DropItem(f"box {box} lies outside the {width}x{height} image")
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    if x2 <= x1 or y2 <= y1:
        raise _DropItem(f"degenerate box {box}")
    return x1, y1, x2, y2


def _make_annotation(
    image_path: Path,
    width: int,
    height: int,
    boxes: list[tuple[float, float, float, float]],
    labels: list[int],
    difficult: list[bool],
) -> Annotation:
    return Annotation(
        image_path=image_path,
        width=width,
        height=height,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),  # (K, 4) even for K = 0
        labels=torch.tensor(labels, dtype=torch.int64),
        difficult=torch.tensor(difficult, dtype=torch.bool),
    )


def _log_summary(kind: str, root: Path, split: str, listed: int, kept: list[Annotation]) -> None:
    objects = sum(len(a.labels) for a in kept)
    difficult = sum(int(a.difficult.sum()) for a in kept)
    logger.info(
        "%s %s [%s]: kept %d of %d images, %d objects (%d difficult)",
        kind, root, split, len(kept), listed, objects, difficult,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------


def _xml_text(element: ET.Element, path: str) -> str | None:
    found = element.find(path)
    if found is None or found.text is None or not found.text.strip():
        return None
    return found.text.strip()


def _find_voc_image(root: Path, image_id: str, xml_root: ET.Element) -> Path | None:
    image_dir = root / "JPEGImages"
    candidates = [image_dir / f"{image_id}{ext}" for ext in IMAGE_EXTENSIONS]
    filename = _xml_text(xml_root, "filename")
    if filename is not None:
        candidates.append(image_dir / Path(filename).name)
    return next((p for p in candidates if p.is_file()), None)


def _voc_image_size(xml_root: ET.Element, image_path: Path) -> tuple[int, int]:
    """``(width, height)``: the XML ``size`` checked against the image header, or the header alone
    when ``size`` is missing or 0. Raises ``_DropItem`` when they disagree or the image is
    unreadable, since boxes drawn on another size cannot be trusted."""
    try:
        header_size = read_image_size(image_path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise _DropItem(f"unreadable image {image_path}: {exc}") from None
    try:
        xml_size = (
            int(float(_xml_text(xml_root, "size/width") or 0)),
            int(float(_xml_text(xml_root, "size/height") or 0)),
        )
    except ValueError:
        xml_size = (0, 0)
    if xml_size[0] <= 0 or xml_size[1] <= 0:
        logger.debug("%s: no usable <size>, using the image header %s", image_path, header_size)
        return header_size
    if xml_size != header_size:
        raise _DropItem(
            f"<size> {xml_size[0]}x{xml_size[1]} differs from the image "
            f"{image_path.name} ({header_size[0]}x{header_size[1]} after EXIF rotation)"
        )
    return xml_size


def _parse_voc_object(
    obj: ET.Element, class_index: dict[str, int], width: int, height: int
) -> tuple[tuple[float, float, float, float], int, bool]:
    name = _xml_text(obj, "name")
    if name not in class_index:
        raise _DropItem(f"unknown class {name!r}")
    coords = [_xml_text(obj, f"bndbox/{tag}") for tag in ("xmin", "ymin", "xmax", "ymax")]
    if any(c is None for c in coords):
        raise _DropItem(f"{name!r} has no complete <bndbox>")
    try:
        xmin, ymin, xmax, ymax = (float(c) for c in coords)  # type: ignore[arg-type]
        difficult = int(float(_xml_text(obj, "difficult") or 0)) == 1
    except ValueError as exc:
        raise _DropItem(f"{name!r} has a non-numeric field: {exc}") from None
    # VOC is 1-based inclusive: pixel column xmin covers [xmin - 1, xmin) in edge coordinates.
    box = _validated_box_xyxy((xmin - 1.0, ymin - 1.0, xmax, ymax), width, height)
    return box, class_index[name], difficult


def _read_voc_item(root: Path, image_id: str, class_index: dict[str, int]) -> Annotation:
    xml_path = root / "Annotations" / f"{image_id}.xml"
    try:
        xml_root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise _DropItem("annotation file missing") from None
    except (ET.ParseError, OSError) as exc:
        raise _DropItem(f"unparsable XML: {exc}") from None
    image_path = _find_voc_image(root, image_id, xml_root)
    if image_path is None:
        raise _DropItem(f"image {image_id!r} not found in {root / 'JPEGImages'}")
    width, height = _voc_image_size(xml_root, image_path)

    boxes, labels, difficult = [], [], []
    for i, obj in enumerate(xml_root.findall("object")):
        try:
            box, label, is_difficult = _parse_voc_object(obj, class_index, width, height)
        except _DropItem as exc:
            logger.warning("%s: object %d dropped: %s", xml_path, i, exc)
            continue
        boxes.append(box)
        labels.append(label)
        difficult.append(is_difficult)
    if not boxes:
        raise _DropItem("no valid object left")
    return _make_annotation(image_path, width, height, boxes, labels, difficult)


def _split_ids(root: Path, split: str) -> list[str]:
    ids = voc_split_ids(root, split)
    if ids is None:
        split_file = voc_split_file(root, split)
        raise ValueError(f"split file {split_file} not found (root={root}, split={split!r})")
    return ids


def voc_class_names(root: str | Path, split: str) -> list[str]:
    """Every class name the annotation files of ``root``'s ``split`` use, sorted.

    Files that are missing or do not parse are left out here; ``read_voc`` warns about them."""
    root = Path(root)
    names = set()
    for image_id in _split_ids(root, split):
        try:
            xml_root = ET.parse(root / "Annotations" / f"{image_id}.xml").getroot()
        except (ET.ParseError, OSError):
            continue
        names.update(n for obj in xml_root.findall("object") if (n := _xml_text(obj, "name")))
    return sorted(names)


def read_voc(
    root: str | Path, split: str, class_names: Sequence[str] = VOC_CLASSES
) -> list[Annotation]:
    """Read ``root/ImageSets/Main/<split>.txt`` and its ``Annotations/<id>.xml`` files.

    Returns one ``Annotation`` per usable image, in split-file order, with pixel xyxy boxes
    (``x1 = xmin - 1``, ``y1 = ymin - 1``, ``x2 = xmax``, ``y2 = ymax``) and VOC's difficult flag.
    Every image header is opened: it proves the image exists, and its size (after EXIF rotation)
    must match the XML ``size``, which it replaces when that is missing or 0.
    Raises ``ValueError`` when the split file is missing.
    """
    root = Path(root)
    class_index = _class_index(class_names)
    ids = _split_ids(root, split)

    annotations = []
    for image_id in ids:
        try:
            annotations.append(_read_voc_item(root, image_id, class_index))
        except _DropItem as exc:
            logger.warning("%s: image skipped: %s", root / "Annotations" / f"{image_id}.xml", exc)
    _log_summary("VOC", root, split, len(ids), annotations)
    return annotations


# --------------------------------------------------------------------------------------------
# YOLO
# --------------------------------------------------------------------------------------------


def load_class_names(path: str | Path) -> list[str]:
    """Read one class name per line (YOLO ``classes.txt``, darknet ``.names``), blank lines skipped.

    Raises ``ValueError`` when the file is missing, empty or lists a name twice.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"class-name file {path} not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class-name file {path} lists no names")
    _class_index(names)
    return names


def _yolo_label_path(image_path: Path) -> Path:
    """The darknet / Ultralytics rule: the last ``images`` folder becomes ``labels``, ext .txt."""
    parts = list(image_path.parts)
    if "images" in parts:
        last = len(parts) - 1 - parts[::-1].index("images")
        parts[last] = "labels"
        return Path(*parts).with_suffix(".txt")
    return image_path.with_suffix(".txt")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _yolo_images(root: Path, split: str) -> list[Path]:
    """Images of ``split``: ``images/<split>/``, else the list ``<split>.txt``, else ``images/``."""
    split_dir = root / "images" / split
    if split_dir.is_dir():
        return _list_images(split_dir)
    list_file = root / f"{split}.txt"
    if list_file.is_file():
        lines = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        return [(root / line) if not Path(line).is_absolute() else Path(line) for line in lines]
    flat_dir = root / "images"
    if flat_dir.is_dir():
        logger.warning(
            "%s has neither images/%s/ nor %s.txt: every image in %s is used for split %r",
            root, split, split, flat_dir, split,
        )  # fmt: skip
        return _list_images(flat_dir)
    raise ValueError(
        f"no YOLO images for split {split!r}: none of {split_dir}, {list_file}, {flat_dir} exists"
    )


def _parse_yolo_line(
    line: str, num_classes: int, width: int, height: int
) -> tuple[tuple[float, float, float, float], int]:
    fields = line.split()
    if len(fields) != 5:
        raise _DropItem(f"expected 5 fields 'class cx cy w h', got {len(fields)}")
    try:
        class_id = float(fields[0])
        cx, cy, w, h = (float(f) for f in fields[1:])
    except ValueError:
        raise _DropItem("non-numeric field") from None
    if not class_id.is_integer() or not 0 <= class_id < num_classes:
        raise _DropItem(f"unknown class id {fields[0]} (have {num_classes} classes)")
    if w <= 0 or h <= 0:
        raise _DropItem(f"degenerate box w={w} h={h}")
    box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
    return _validated_box_xyxy(box, width, height), int(class_id)


def _read_yolo_item(image_path: Path, num_classes: int) -> Annotation:
    try:
        width, height = read_image_size(image_path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise _DropItem(f"missing or unreadable image: {exc}") from None
    label_path = _yolo_label_path(image_path)
    if not label_path.is_file():
        raise _DropItem(f"no label file {label_path}")
    boxes, labels = [], []
    for line_no, line in enumerate(label_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            box, label = _parse_yolo_line(line, num_classes, width, height)
        except _DropItem as exc:
            logger.warning("%s:%d: line dropped: %s", label_path, line_no, exc)
            continue
        boxes.append(box)
        labels.append(label)
    if not boxes:
        raise _DropItem(f"no valid object left in {label_path}")
    return _make_annotation(image_path, width, height, boxes, labels, [False] * len(boxes))


def read_yolo(root: str | Path, split: str, class_names: Sequence[str]) -> list[Annotation]:
    """Read a YOLO-format dataset: ``images/<split>/*`` with ``labels/<split>/<stem>.txt``.

    Falls back to a ``root/<split>.txt`` list of image paths (relative to ``root``), then to flat
    ``images/`` + ``labels/`` folders. Label lines are ``class cx cy w h`` normalised to the image,
    whose size comes from its header (after EXIF rotation). Returns pixel xyxy ``Annotation``s
    with ``difficult`` all False. Raises ``ValueError`` when no image folder or list exists.
    """
    root = Path(root)
    num_classes = len(_class_index(class_names))
    images = _yolo_images(root, split)
    annotations = []
    for image_path in images:
        try:
            annotations.append(_read_yolo_item(image_path, num_classes))
        except _DropItem as exc:
            logger.warning("%s: image skipped: %s", image_path, exc)
    _log_summary("YOLO", root, split, len(images), annotations)
    return annotations


def read_datasets(
    roots: Sequence[str | Path] | str | Path,
    fmt: Literal["voc", "yolo"],
    split: str,
    class_names: Sequence[str] = VOC_CLASSES,
) -> list[Annotation]:
    """Read ``split`` of every root in ``fmt`` and concatenate them, in the order given.

    Raises ``ValueError`` for an unknown ``fmt`` or an empty ``roots``.
    """
    readers = {"voc": read_voc, "yolo": read_yolo}
    if fmt not in readers:
        raise ValueError(f"fmt must be 'voc' or 'yolo', got {fmt!r}")
    if isinstance(roots, (str, Path)):
        roots = [roots]
    if not roots:
        raise ValueError("roots must name at least one dataset folder, got none")
    annotations: list[Annotation] = []
    for root in roots:
        annotations.extend(readers[fmt](root, split, class_names))
    return annotations


# --------------------------------------------------------------------------------------------
# Dataset and transforms
# --------------------------------------------------------------------------------------------


# The per-box tensors of a sample besides its boxes; the last two only with soft targets.
PER_BOX = ("labels", "difficult", "class_probs", "objectness")


def _per_box_tensors(inputs: Any) -> tuple[torch.Tensor, ...]:
    """SanitizeBoundingBoxes' labels_getter: drop every per-box tensor with its box."""
    _, target = inputs
    return tuple(target[key] for key in PER_BOX if key in target)


def build_transform(image_size: int, train: bool) -> v2.Compose:
    """The v2 pipeline for ``(tv_tensors.Image uint8, {"boxes": BoundingBoxes, ...})`` samples.

    Output: float32 image (3, image_size, image_size) in [0, 1] and pixel xyxy boxes on it.
    Eval only resizes (no letterbox: the aspect ratio is not kept, as in the paper). Training adds
    the paper's augmentation: scaling and translation up to 20% of the image, exposure and
    saturation up to 1.5x, a horizontal flip, then boxes are clamped and those thinner than
    ``MIN_BOX_SIZE_PX`` are dropped with their labels and difficult flags.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    # Resizing first is the same geometry (affine scale/translate are relative to the image and
    # commute with a plain resize) but the affine and colour ops then touch far fewer pixels.
    resize = v2.Resize((image_size, image_size), antialias=True)
    to_float = v2.ToDtype(torch.float32, scale=True)
    if not train:
        return v2.Compose([resize, to_float])
    return v2.Compose(
        [
            resize,
            v2.RandomAffine(degrees=0.0, translate=(0.2, 0.2), scale=(0.8, 1.2)),
            v2.ColorJitter(brightness=0.5, saturation=0.5, hue=HUE_JITTER),
            v2.RandomHorizontalFlip(p=0.5),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=MIN_BOX_SIZE_PX, labels_getter=_per_box_tensors),
            to_float,
        ]
    )


Sample = tuple[torch.Tensor, dict[str, Any]]
_Extra = dict[str, torch.Tensor]  # the per-box tensors of a sample (PER_BOX)


class DetectionDataset(Dataset[Sample]):
    """Images and targets for training or evaluation.

    ``dataset[i]`` is ``(image, target)``: image float32 (3, image_size, image_size) RGB in [0, 1];
    target ``{"boxes": (K, 4) float32 xyxy normalised to [0, 1], "labels": (K,) int64,
    "difficult": (K,) bool, "image_id": i, "orig_size": (h, w) in pixels}``, plus
    ``"class_probs"`` and ``"objectness"`` when the annotations carry soft targets (all of them
    or none must).
    With ``train`` and probability ``mosaic``, four images (``i`` and three random ones) are tiled
    2x2 before the same pipeline; ``orig_size`` is then the tiled canvas. ``transform`` replaces
    ``build_transform(image_size, train)`` (it must resize to ``image_size`` and end in float).
    """

    def __init__(
        self,
        annotations: Sequence[Annotation],
        image_size: int,
        train: bool,
        mosaic: float = 0.0,
        transform: v2.Transform | None = None,
    ) -> None:
        if len(annotations) == 0:
            raise ValueError("annotations is empty: nothing to load")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 <= mosaic <= 1.0:
            raise ValueError(f"mosaic must be a probability in [0, 1], got {mosaic}")
        self.annotations = list(annotations)
        if len({ann.soft for ann in self.annotations}) > 1:
            raise ValueError("either every annotation carries soft targets or none does")
        self.image_size = image_size
        self.train = train
        self.mosaic = mosaic
        self.transform = transform if transform is not None else build_transform(image_size, train)

    def __len__(self) -> int:
        return len(self.annotations)

    def _load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.BoundingBoxes, _Extra]:
        """uint8 image (3, H, W), its pixel xyxy boxes, and labels/difficult of annotation i."""
        ann = self.annotations[index]
        pil_image = load_image_rgb(ann.image_path)
        if pil_image.size != (ann.width, ann.height):
            raise ValueError(
                f"{ann.image_path} decodes to {pil_image.size[0]}x{pil_image.size[1]}, "
                f"but its annotation says {ann.width}x{ann.height}"
            )
        image = tv_tensors.Image(F.pil_to_tensor(pil_image))
        boxes = tv_tensors.BoundingBoxes(
            ann.boxes.clone(), format=tv_tensors.BoundingBoxFormat.XYXY,
            canvas_size=(ann.height, ann.width),
        )  # fmt: skip
        extra = {"labels": ann.labels.clone(), "difficult": ann.difficult.clone()}
        if ann.soft:
            extra |= {"class_probs": ann.class_probs.clone(), "objectness": ann.objectness.clone()}
        return image, boxes, extra

    def _load_mosaic(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.BoundingBoxes, _Extra]:
        """Tile image ``index`` and three random ones, each plainly resized, into a 2x2 canvas."""
        tile = max(1, self.image_size // 2)  # the canvas is then about image_size: no wasted pixels
        indices = [index, *torch.randint(len(self.annotations), (3,)).tolist()]
        resize = v2.Resize((tile, tile), antialias=True)
        canvas = torch.zeros((3, 2 * tile, 2 * tile), dtype=torch.uint8)
        parts_boxes, parts_extra = [], []
        for quadrant, i in enumerate(indices):
            image, boxes, extra = self._load(i)
            image, boxes = resize(image, boxes)
            left, top = (quadrant % 2) * tile, (quadrant // 2) * tile
            canvas[:, top : top + tile, left : left + tile] = image
            # Padding the tile out to the canvas moves its boxes by (left, top), via torchvision.
            boxes = F.pad(boxes, [left, top, tile - left, tile - top])
            parts_boxes.append(boxes.as_subclass(torch.Tensor))
            parts_extra.append(extra)
        boxes = tv_tensors.BoundingBoxes(
            torch.cat(parts_boxes), format=tv_tensors.BoundingBoxFormat.XYXY,
            canvas_size=(2 * tile, 2 * tile),
        )  # fmt: skip
        extra = {key: torch.cat([part[key] for part in parts_extra]) for key in parts_extra[0]}
        return tv_tensors.Image(canvas), boxes, extra

    def __getitem__(self, index: int) -> Sample:
        if self.train and self.mosaic > 0.0 and torch.rand(()).item() < self.mosaic:
            image, boxes, extra = self._load_mosaic(index)
        else:
            image, boxes, extra = self._load(index)
        orig_size = (int(image.shape[-2]), int(image.shape[-1]))
        image, target = self.transform(image, {"boxes": boxes, **extra})
        height, width = image.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float() / scale,  # (K, 4) in [0, 1]
            **{key: target[key] for key in PER_BOX if key in target},
            "image_id": index,
            "orig_size": orig_size,
        }
        return image.as_subclass(torch.Tensor), target


def detection_collate(batch: Sequence[Sample]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack images into (N, 3, H, W) and keep the per-image targets as a list (K varies)."""
    if len(batch) == 0:
        raise ValueError("batch is empty")
    images = torch.stack([image for image, _ in batch])  # (N, 3, H, W)
    return images, [target for _, target in batch]


def target_grid(target: dict[str, Any], S: int, C: int) -> torch.Tensor:
    """One sample's (S, S, C + 5) training target, soft targets included when it has them.

    Difficult objects are left out, as Darknet's ``voc_label.py`` does: the evaluation ignores
    them, so training neither rewards nor penalises finding them.
    """
    keep = ~target["difficult"]
    soft = [target[k][keep] for k in ("class_probs", "objectness") if k in target]
    return encode_targets(target["boxes"][keep], target["labels"][keep], S, C, *soft)


def label_cells(target: dict[str, Any], S: int) -> torch.Tensor:
    """One sample's (S, S) map of the box class each cell lies in (``model.boxes.box_cells``),
    -1 outside every box; difficult objects are left out, as in ``target_grid``."""
    keep = ~target["difficult"]
    return box_cells(target["boxes"][keep], target["labels"][keep], S)
