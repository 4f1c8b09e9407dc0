"""Builders shared by the tests: synthetic VOC trees, and where the shared data lies."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# ../shared beside the repository: present in CI and on the developers' machines, absent in a
# user's fresh clone, where the tests that need it skip.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def write_image(
    path: Path, width: int, height: int, white_boxes_xyxy: tuple = (), exif_orientation: int = 1
) -> None:
    """Black image with white rectangles at the given pixel xyxy boxes (edge coordinates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (width, height), (0, 0, 0))
    for x1, y1, x2, y2 in white_boxes_xyxy:
        image.paste((255, 255, 255), (int(x1), int(y1), int(x2), int(y2)))
    if exif_orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, exif=exif)
    else:
        image.save(path)


def voc_xml(size: tuple[int, int] | None, objects: list[tuple]) -> str:
    """objects: (name, xmin, ymin, xmax, ymax, difficult), VOC 1-based inclusive coordinates."""
    size_xml = (
        ""
        if size is None
        else (f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    )
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(diff)}</difficult><bndbox>"
        f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, x1, y1, x2, y2, diff in objects
    )
    return f"<annotation><filename>x.jpg</filename>{size_xml}{objs}</annotation>"


def make_voc(root: Path, items: dict[str, tuple], split: str = "train", ext: str = ".png") -> Path:
    """items: id -> (width, height, objects[, xml_size]); writes images, XML and the split file."""
    for image_id, (width, height, objects, *xml_size) in items.items():
        write_image(root / "JPEGImages" / f"{image_id}{ext}", width, height)
        size = xml_size[0] if xml_size else (width, height)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(size, objects))
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(items) + "\n")
    return root


def make_mirrored_voc(root: Path, sizes: list[tuple[int, int]], seed: int = 0) -> tuple[Path, Path]:
    """``root/plain`` and ``root/mirrored``: val splits of noise images of the given (width,
    height), the second holding the same pixels mirrored by PIL (PNG, lossless), one dog each."""
    rng = np.random.default_rng(seed)
    items = {f"n{i}": (w, h, [("dog", 5, 5, w // 2, h // 2, 0)]) for i, (w, h) in
             enumerate(sizes)}  # fmt: skip
    plain = make_voc(root / "plain", items, split="val")
    mirrored = make_voc(root / "mirrored", items, split="val")
    for image_id, (w, h, _) in items.items():
        pixels = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        pixels.save(plain / "JPEGImages" / f"{image_id}.png")
        ImageOps.mirror(pixels).save(mirrored / "JPEGImages" / f"{image_id}.png")
    return plain, mirrored


def unmirror_by_hand(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Pixel xyxy boxes on the mirror image of a ``width``-wide image, on the image itself."""
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((width - x2, y1, width - x1, y2), dim=1)


# EXIF orientation -> the transpose that stores an upright image so that a viewer shows it upright
# (the inverse of what ImageOps.exif_transpose applies).
EXIF_STORE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def encode(image: Image.Image, fmt: str = "PNG", orientation: int | None = None, **kw) -> bytes:
    """``image`` saved as ``fmt`` in memory, with an EXIF orientation tag when given."""
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def quadrant(width: int, height: int) -> Image.Image:
    """Black, with the top-left quarter white: any wrong rotation or flip moves it."""
    image = Image.new("RGB", (width, height))
    image.paste((255, 255, 255), (0, 0, width // 2, height // 2))
    return image


def write_darknet_weights(
    path: Path, convs: list[tuple[int, int, int, bool]], seed: int = 0
) -> Path:
    """Random weights in Darknet's layout (header 0.2.0, 64-bit seen) for convs given in file
    order as (inputs, filters, kernel, batch norm)."""
    rng = np.random.default_rng(seed)
    values = []
    for c_in, n, k, bn in convs:
        values.append(rng.normal(0, 0.1, n))  # biases
        if bn:
            values += [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n)]
        values.append(rng.normal(0, np.sqrt(2 / (c_in * k * k)), n * c_in * k * k))
    header = np.array([0, 2, 0], "<i4").tobytes() + np.array([0], "<i8").tobytes()
    path.write_bytes(header + np.concatenate(values).astype("<f4").tobytes())
    return path


# A tiny [yolo] detector: 64 px in, stride 32 after layer 4 (2x2), 3 anchors x (20 + 5).
TINY_YOLO = """
[net]
width=64
height=64
channels=3
[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky
[maxpool]
size=2
stride=2
[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky
[maxpool]
size=2
stride=2
[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=leaky
[convolutional]
filters=75
size=1
stride=1
pad=1
activation=linear
[yolo]
mask=0,1,2
anchors=10,14,23,27,37,58
classes=20
num=3
scale_x_y=1.05
"""


def write_tiny_yolo(
    folder: Path, seed: int = 0, filters: int = 16, name: str = "tiny"
) -> tuple[Path, Path]:
    """The cfg (``filters`` in its stride-32 conv, layer 4) and random weights in Darknet's
    layout, as ``folder/<name>.cfg`` and ``.weights``."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / f"{name}.cfg"
    cfg.write_text(TINY_YOLO.replace("filters=16", f"filters={filters}"))
    convs = [(3, 8, 3, True), (8, 8, 3, True), (8, filters, 3, True), (filters, 75, 1, False)]
    return cfg, write_darknet_weights(folder / f"{name}.weights", convs, seed)


def make_dog_voc(root: Path, images: int = 4) -> Path:
    """A VOC tree of ``images`` 64 x 64 pictures, one dog each; the first is also the val split."""
    items = {f"img{k}": (64, 64, [("dog", 5 + k, 5, 40, 50, 0)]) for k in range(images)}
    voc = make_voc(root, items)
    for image_id in items:
        write_image(voc / "JPEGImages" / f"{image_id}.png", 64, 64, [(4, 4, 40, 50)])
    (voc / "ImageSets" / "Main" / "val.txt").write_text("img0\n")
    return voc
