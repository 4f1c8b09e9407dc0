"""Named YOLOv1 architectures, each a frozen dataclass built from a Darknet-style layer list.

A layer list holds, in the seed notebook's form:
- ``(kernel, filters, stride, padding)``: a CNNBlock (conv without bias, BatchNorm, LeakyReLU 0.1);
- ``"M"``: a 2x2 max-pool with stride 2;
- ``[conv_a, conv_b, repeats]``: the pair of convolutions repeated ``repeats`` times.
"""

from __future__ import annotations

from dataclasses import dataclass

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

Conv = tuple[int, int, int, int]  # (kernel, filters, stride, padding)
Layer = Conv | str | list

# The seed notebook's list with its missing comma after (7, 64, 2, 3) restored: 24 conv layers.
DARKNET24: tuple[Layer, ...] = (
    (7, 64, 2, 3),
    "M",
    (3, 192, 1, 1),
    "M",
    (1, 128, 1, 0),
    (3, 256, 1, 1),
    (1, 256, 1, 0),
    (3, 512, 1, 1),
    "M",
    [(1, 256, 1, 0), (3, 512, 1, 1), 4],
    (1, 512, 1, 0),
    (3, 1024, 1, 1),
    "M",
    [(1, 512, 1, 0), (3, 1024, 1, 1), 2],
    (3, 1024, 1, 1),
    (3, 1024, 2, 1),
    (3, 1024, 1, 1),
    (3, 1024, 1, 1),
)

# Fast YOLO, as Darknet's yolov1-tiny.cfg: six conv + 2x2 max-pool stages (16 ... 512 filters),
# then conv 1024 and conv 256; the six pools divide the input by 64 (448 -> 7).
TINY9: tuple[Layer, ...] = (
    (3, 16, 1, 1), "M",
    (3, 32, 1, 1), "M",
    (3, 64, 1, 1), "M",
    (3, 128, 1, 1), "M",
    (3, 256, 1, 1), "M",
    (3, 512, 1, 1), "M",
    (3, 1024, 1, 1),
    (3, 256, 1, 1),
)  # fmt: skip


@dataclass(frozen=True)
class ArchConfig:
    """One named network: its backbone layer list and its fully connected head."""

    name: str
    layers: tuple[Layer, ...]
    head_hidden: int = 496  # the seed's hidden width; the paper uses 4096
    head_dropout: float = 0.0  # the seed uses 0.0; the paper 0.5
    downsample: int = 64  # input pixels per grid cell: 448 / 64 = 7 = S


ARCHITECTURES: dict[str, ArchConfig] = {
    "yolov1": ArchConfig("yolov1", DARKNET24),
    "yolov1-paper": ArchConfig("yolov1-paper", DARKNET24, head_hidden=4096, head_dropout=0.5),
    "yolov1-tiny": ArchConfig("yolov1-tiny", TINY9, head_hidden=496, head_dropout=0.0),
}


def get_arch(name: str) -> ArchConfig:
    """Return the architecture called ``name``; raise ``ValueError`` listing the known names."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {name!r}; known: {known}") from None
