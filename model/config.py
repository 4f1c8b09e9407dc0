"""Named YOLOv1 architectures, each a frozen dataclass built from a Darknet-style layer list.

A layer list holds, in the seed notebook's form:
- ``(kernel, filters, stride, padding)``: a CNNBlock (conv without bias, BatchNorm, LeakyReLU 0.1);
- ``"M"``: a 2x2 max-pool with stride 2;
- ``[conv_a, conv_b, repeats]``: the pair of convolutions repeated ``repeats`` times;
and, for imported Darknet cfgs, ``(kernel, filters, stride, padding, activation,
batch_normalize)`` (a conv with a bias when not batch-normalised) and ``("M", size, stride,
padding)`` (Darknet's max-pool padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

Conv = tuple  # (kernel, filters, stride, padding[, activation, batch_normalize])
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
    """One network: an optional Darknet stem, a layer list, and the YOLOv1 head.

    ``to_dict``/``from_dict`` round-trip it through JSON, so that a checkpoint carries its own
    architecture and any cfg of YOLOv1 layer types becomes a servable model.
    """

    name: str
    layers: tuple[Layer, ...]
    head_hidden: int = 496  # the seed's hidden width; the paper uses 4096; 0: no hidden layer
    head_dropout: float = 0.0  # the seed uses 0.0; the paper 0.5
    downsample: int = 64  # the input size must be a multiple of this (448 / 64 = 7 = S)
    # Darknet's [local] before the connected layers (yolov1.cfg): (size, filters, stride, pad,
    # activation); None: no local layer.
    head_local: tuple[int, int, int, int, str] | None = None
    head_activation: str = "leaky"  # of the hidden connected layer
    # Added to the variance in BatchNorm. Imported Darknet weights use 0 with the variance
    # stored as (sqrt(var) + 1e-6)^2, which is Darknet's normalisation exactly.
    batchnorm_eps: float = 1e-5
    # A Darknet cfg ([net] and layers up to a feature map) run before ``layers``: a pretrained
    # backbone, for example a teacher's. None: ``layers`` take the image.
    darknet_cfg: str | None = None
    # A second Darknet cfg run on the same image beside ``darknet_cfg`` (another pretrained
    # backbone); its last map, the same size as the first's, is concatenated after the first's
    # channels. None: one backbone.
    darknet_side_cfg: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # The side cfg only when there is one: one-backbone files keep the fields they had.
        side = {} if self.darknet_side_cfg is None else {"darknet_side_cfg": self.darknet_side_cfg}
        return {
            "name": self.name,
            "layers": _to_json(self.layers),
            "head_hidden": self.head_hidden,
            "head_dropout": self.head_dropout,
            "downsample": self.downsample,
            "head_local": None if self.head_local is None else list(self.head_local),
            "head_activation": self.head_activation,
            "batchnorm_eps": self.batchnorm_eps,
            "darknet_cfg": self.darknet_cfg,
            **side,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        """Rebuild and validate an architecture; raise ``ValueError`` naming what is wrong."""
        if not isinstance(d, dict) or "layers" not in d or "name" not in d:
            raise ValueError(f"an architecture needs 'name' and 'layers', got {d!r:.200}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}")
        local = d.get("head_local")
        arch = cls(
            name=str(d["name"]),
            layers=tuple(_from_json(layer) for layer in d["layers"]),
            head_hidden=int(d.get("head_hidden", 496)),
            head_dropout=float(d.get("head_dropout", 0.0)),
            downsample=int(d.get("downsample", 64)),
            head_local=None if local is None else _local_spec(local),
            head_activation=str(d.get("head_activation", "leaky")),
            batchnorm_eps=float(d.get("batchnorm_eps", 1e-5)),
            darknet_cfg=d.get("darknet_cfg"),
            darknet_side_cfg=d.get("darknet_side_cfg"),
        )
        arch.validate()
        return arch

    def validate(self) -> None:
        for layer in self.layers:
            _check_layer(layer)
        if self.head_hidden < 0 or not 0 <= self.head_dropout < 1 or self.downsample < 1:
            raise ValueError(
                f"bad head: hidden={self.head_hidden}, dropout={self.head_dropout}, "
                f"downsample={self.downsample}"
            )
        if self.head_activation not in ACTIVATIONS:
            raise ValueError(f"unknown head activation {self.head_activation!r}")
        for cfg in (self.darknet_cfg, self.darknet_side_cfg):
            if cfg is not None and not isinstance(cfg, str):
                raise ValueError("darknet_cfg and darknet_side_cfg must be cfg text")
        if self.darknet_side_cfg is not None and self.darknet_cfg is None:
            raise ValueError("darknet_side_cfg runs beside darknet_cfg, which is not set")


# Activations a layer list may name (Darknet's names).
ACTIVATIONS = ("linear", "leaky", "relu", "relu6", "logistic")


def _local_spec(value: Any) -> tuple[int, int, int, int, str]:
    size, filters, stride, pad, activation = value
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r} in head_local {value!r}")
    return int(size), int(filters), int(stride), int(pad), str(activation)


def _check_layer(layer: Any) -> None:
    """Raise ``ValueError`` unless ``layer`` is a conv tuple, a pool or a repeat group."""
    if layer == "M":
        return
    if isinstance(layer, tuple) and layer and layer[0] == "M":
        if len(layer) != 4 or not all(isinstance(v, int) and v >= 0 for v in layer[1:]):
            raise ValueError(f"a pool is 'M' or ('M', size, stride, padding), got {layer!r}")
        return
    if isinstance(layer, tuple):
        ints, extra = layer[:4], layer[4:]
        ok = len(layer) in (4, 6) and all(isinstance(v, int) and v >= 0 for v in ints)
        ok = ok and ints[0] >= 1 and ints[1] >= 1 and ints[2] >= 1
        if extra:
            ok = ok and extra[0] in ACTIVATIONS and isinstance(extra[1], bool)
        if not ok:
            raise ValueError(
                "a conv is (kernel, filters, stride, padding) or (kernel, filters, stride, "
                f"padding, activation, batch_normalize), got {layer!r}"
            )
        return
    if isinstance(layer, list) and len(layer) >= 2 and isinstance(layer[-1], int):
        for conv in layer[:-1]:
            if not isinstance(conv, tuple) or conv[:1] == ("M",):
                raise ValueError(f"a repeat group holds convs only, got {layer!r}")
            _check_layer(conv)
        return
    raise ValueError(f"unknown layer spec {layer!r}: expected a tuple, 'M' or a list")


def _to_json(layers: tuple[Layer, ...]) -> list[Any]:
    return [
        [list(c) for c in layer[:-1]] + [layer[-1]]
        if isinstance(layer, list)
        else list(layer)
        if isinstance(layer, tuple)
        else layer
        for layer in layers
    ]


def _from_json(item: Any) -> Layer:
    """JSON back to the seed's form: a list of ints (or "M" first) is a tuple, a list ending
    with an int after lists is a repeat group."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and isinstance(item[0], list):
        return [tuple(c) for c in item[:-1]] + [item[-1]]
    if isinstance(item, list):
        return tuple(item)
    raise ValueError(f"unknown layer spec {item!r}")


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
