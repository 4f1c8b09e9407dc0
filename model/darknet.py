"""Darknet interop: parse a ``.cfg``, build the network in PyTorch, load a ``.weights`` file.

Follows Darknet's C code (pjreddie/darknet and AlexeyAB/darknet ``src/parser.c`` and the layer
files) for every layer the YOLOv1 cfgs and the pretrained VOC detectors in ``shared/teachers``
use: convolutional (groups, batch_normalize, pad/padding), maxpool, local, dropout, connected,
detection (YOLOv1), route (several layers, groups), shortcut, upsample and yolo.

Numerics are Darknet's at inference: batch norm is ``(x - mean) / (sqrt(var) + 1e-6) * scale +
bias``, leaky has slope 0.1, ``pad=1`` pads ``size // 2``, a max-pool pads ``size - 1`` (left
and top ``padding // 2``) with -inf, dropout is the identity.

Layer indices are Darknet's: the first section after ``[net]`` is layer 0.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from model.config import ACTIVATIONS

logger = logging.getLogger(__name__)

DARKNET_BN_EPS = 1e-6  # added to sqrt(var), not to var (Darknet's normalize_cpu)

# Options each section may carry. Training-only options (learning rates, jitter, loss weights,
# augmentation) are accepted and ignored; an option that changes inference and that we do not
# implement is refused where it is read (see _refuse).
_SECTION_KINDS = (
    "net", "network", "convolutional", "conv", "maxpool", "max", "local", "dropout",
    "connected", "conn", "detection", "route", "shortcut", "upsample", "yolo",
)  # fmt: skip
_ALIASES = {"network": "net", "conv": "convolutional", "max": "maxpool", "conn": "connected"}


class DarknetError(ValueError):
    """A cfg or weights file that this reader cannot use, with where and why."""


@dataclass
class Section:
    """One ``[kind]`` block of a cfg: its options as written, and where it starts."""

    kind: str
    line: int
    options: dict[str, str] = field(default_factory=dict)
    source: str = "<cfg>"

    @classmethod
    def of(cls, kind: str, **options: object) -> Section:
        """A section built in code: ``Section.of("maxpool", size=2, stride=2)``."""
        return cls(kind, 0, {k: str(v) for k, v in options.items()}, source="<code>")

    def where(self) -> str:
        return f"{self.source}:{self.line} [{self.kind}]"

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.options.get(key, default)

    def get_int(self, key: str, default: int | None = None) -> int:
        value = self.options.get(key)
        if value is None:
            if default is None:
                raise DarknetError(f"{self.where()}: missing option {key!r}")
            return default
        try:
            return int(value)
        except ValueError:
            raise DarknetError(f"{self.where()}: {key}={value!r} is not an integer") from None

    def get_float(self, key: str, default: float) -> float:
        value = self.options.get(key)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise DarknetError(f"{self.where()}: {key}={value!r} is not a number") from None

    def ints(self, key: str) -> list[int]:
        value = self.options.get(key)
        if value is None:
            raise DarknetError(f"{self.where()}: missing option {key!r}")
        try:
            return [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise DarknetError(
                f"{self.where()}: {key}={value!r} is not a list of integers"
            ) from None

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.options.get(key, default)
        if value not in allowed:
            raise DarknetError(
                f"{self.where()}: {key}={value!r} is not supported; expected one of {allowed}"
            )
        return value


def parse_cfg(text: str, source: str = "<cfg>") -> list[Section]:
    """Parse cfg text into sections (``[net]`` first). Comments start with ``#`` or ``;``."""
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            match = re.fullmatch(r"\[([A-Za-z_]+)\]", line)
            if not match:
                raise DarknetError(f"{source}:{number}: malformed section header {line!r}")
            kind = match.group(1).lower()
            if kind not in _SECTION_KINDS:
                raise DarknetError(f"{source}:{number}: unknown section [{kind}]")
            sections.append(Section(_ALIASES.get(kind, kind), number, source=source))
            continue
        if not sections:
            raise DarknetError(f"{source}:{number}: option {line!r} before any section")
        key, sep, value = line.partition("=")
        if not sep:
            raise DarknetError(f"{sections[-1].where()}: line {number} is not key=value: {line!r}")
        sections[-1].options[key.strip()] = value.strip()
    if not sections or sections[0].kind != "net":
        raise DarknetError(f"{source}: a cfg must start with a [net] section")
    return sections


def read_cfg(path: str | Path) -> list[Section]:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DarknetError(f"{path}: cannot read the cfg ({exc})") from None
    return parse_cfg(text, str(path))


def sections_to_text(sections: list[Section]) -> str:
    """Write sections back as cfg text (the form a checkpoint stores)."""
    lines = []
    for s in sections:
        lines.append(f"[{s.kind}]")
        lines += [f"{k}={v}" for k, v in s.options.items()]
        lines.append("")
    return "\n".join(lines)


def layer_inputs(sections: list[Section], index: int) -> list[int]:
    """The layers whose outputs layer ``index`` reads (``sections[index + 1]``; absolute)."""
    s = sections[index + 1]
    if s.kind == "route":
        return [i if i >= 0 else index + i for i in s.ints("layers")]
    previous = [index - 1] if index > 0 else []
    if s.kind == "shortcut":
        return previous + [i if i >= 0 else index + i for i in s.ints("from")]
    return previous


def ancestors(sections: list[Section], index: int) -> set[int]:
    """Layer ``index`` and every layer its output depends on."""
    found, todo = set(), [index]
    while todo:
        i = todo.pop()
        if i not in found:
            found.add(i)
            todo += layer_inputs(sections, i)
    return found


def prune_layers(sections: list[Section], keep: set[int]) -> tuple[list[Section], dict[int, int]]:
    """The cfg with only the layers in ``keep``, references renumbered to absolute indices.

    Returns the sections (``[net]`` first) and the map from old layer index to new. A kept
    layer that reads a dropped one (through a route, a shortcut or as the layer before it)
    raises ``DarknetError``: ``keep`` must hold everything its layers depend on.
    """
    index = {old: new for new, old in enumerate(sorted(keep))}
    out = [sections[0]]
    for old in sorted(keep):
        s = sections[old + 1]
        sources = layer_inputs(sections, old)
        if any(i not in index for i in sources):
            raise DarknetError(f"{s.where()}: reads a layer that is not kept ({sources})")
        options = dict(s.options)
        if s.kind == "route":
            options["layers"] = ",".join(str(index[i]) for i in sources)
        elif s.kind == "shortcut":
            options["from"] = str(index[sources[-1]])
        out.append(Section(s.kind, s.line, options, s.source))
    return out, index


# -- layers --------------------------------------------------------------------------------------


def _refuse(section: Section, key: str, allowed: str) -> None:
    value = section.get(key)
    if value is not None and value != allowed:
        raise DarknetError(f"{section.where()}: {key}={value} is not supported (only {allowed})")


def activation_fn(name: str) -> nn.Module:
    if name == "linear":
        return nn.Identity()
    if name == "leaky":
        return nn.LeakyReLU(0.1)
    if name == "relu":
        return nn.ReLU()
    if name == "relu6":
        return nn.ReLU6()
    if name == "logistic":
        return nn.Sigmoid()
    raise DarknetError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


class DarknetBatchNorm(nn.BatchNorm2d):
    """BatchNorm that trains as PyTorch's and infers as Darknet's: ``/ (sqrt(var) + 1e-6)``.

    ``running_var`` holds the variance exactly as Darknet stores it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        scale = self.weight / (self.running_var.sqrt() + DARKNET_BN_EPS)
        return (x - self.running_mean.view(shape)) * scale.view(shape) + self.bias.view(shape)

    def _check_input_dim(self, x: torch.Tensor) -> None:  # serves (N, C) and (N, C, H, W)
        if x.ndim not in (2, 4):
            raise ValueError(f"expected a 2D or 4D input, got {x.ndim}D")


class Conv(nn.Module):
    """``[convolutional]``: conv (bias only without BN), Darknet batch norm, activation."""

    def __init__(self, s: Section, in_channels: int):
        super().__init__()
        for key, allowed in (("dilation", "1"), ("xnor", "0"), ("binary", "0"), ("deform", "0")):
            _refuse(s, key, allowed)
        filters, size, stride = (
            s.get_int("filters", 1),
            s.get_int("size", 1),
            s.get_int("stride", 1),
        )
        groups = s.get_int("groups", 1)
        padding = size // 2 if s.get_int("pad", 0) else s.get_int("padding", 0)
        if in_channels % groups or filters % groups:
            raise DarknetError(
                f"{s.where()}: groups={groups} does not divide {in_channels} inputs "
                f"and {filters} filters"
            )
        self.batch_normalize = bool(s.get_int("batch_normalize", 0))
        self.conv = nn.Conv2d(
            in_channels, filters, size, stride, padding, groups=groups,
            bias=not self.batch_normalize,
        )  # fmt: skip
        self.bn = DarknetBatchNorm(filters) if self.batch_normalize else nn.Identity()
        self.activation = s.choice("activation", "logistic", ACTIVATIONS)
        self.act = activation_fn(self.activation)
        self.out_channels = filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fold(self) -> None:
        """Fold the (eval-mode) batch norm into the convolution, for inference exports."""
        if not self.batch_normalize:
            return
        bn = self.bn
        scale = bn.weight / (bn.running_var.sqrt() + DARKNET_BN_EPS)
        conv = self.conv
        folded = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            groups=conv.groups, bias=True,
        ).to(conv.weight)  # fmt: skip
        folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        folded.bias.copy_(bn.bias - bn.running_mean * scale)
        self.conv, self.bn, self.batch_normalize = folded, nn.Identity(), False

    def load(self, reader: WeightsReader) -> None:
        n = self.out_channels
        bias = reader.take(n)
        if self.batch_normalize:
            self.bn.bias.copy_(bias)
            self.bn.weight.copy_(reader.take(n))
            self.bn.running_mean.copy_(reader.take(n))
            self.bn.running_var.copy_(reader.take(n))
        else:
            self.conv.bias.copy_(bias)
        w = self.conv.weight
        w.copy_(reader.take(w.numel()).view_as(w))


class MaxPool(nn.Module):
    """``[maxpool]`` as Darknet: output ``(w + padding - size) // stride + 1``, window start
    ``i * stride - padding // 2``, cells outside the input never win."""

    def __init__(self, s: Section):
        super().__init__()
        for key in ("maxpool_depth", "antialiasing"):
            _refuse(s, key, "0")
        self.size = s.get_int("size", 1)
        self.stride = s.get_int("stride", 1)
        self.padding = s.get_int("padding", self.size - 1)

    def out_size(self, n: int) -> int:
        return (n + self.padding - self.size) // self.stride + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        oh, ow = self.out_size(h), self.out_size(w)
        left = self.padding // 2
        right = (ow - 1) * self.stride + self.size - w - left
        bottom = (oh - 1) * self.stride + self.size - h - left
        if left or right > 0 or bottom > 0:
            x = F.pad(x, (left, max(right, 0), left, max(bottom, 0)), value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)[..., :oh, :ow]


class Local(nn.Module):
    """``[local]``: a convolution whose weights differ at every output location.

    Weights (L, n, c*size*size) for L = out_h * out_w locations, in Darknet's im2col order
    (channel, then kernel row, then kernel column); biases (n, out_h, out_w).
    """

    def __init__(self, s: Section, in_channels: int, h: int, w: int):
        super().__init__()
        self.size, self.stride, self.pad = (
            s.get_int("size", 1),
            s.get_int("stride", 1),
            s.get_int("pad", 0),
        )
        self.filters = s.get_int("filters", 1)
        # Darknet's local_out_height: h - 1 with pad, h - size without; im2col pads `pad` pixels.
        self.out_h = (h - 1 if self.pad else h - self.size) // self.stride + 1
        self.out_w = (w - 1 if self.pad else w - self.size) // self.stride + 1
        if self.pad and (h + 2 * self.pad - self.size) // self.stride + 1 != self.out_h:
            raise DarknetError(f"{s.where()}: pad={self.pad} with size={self.size} is inconsistent")
        if self.out_h < 1 or self.out_w < 1:
            raise DarknetError(f"{s.where()}: input {h}x{w} is smaller than size={self.size}")
        L, k = self.out_h * self.out_w, in_channels * self.size * self.size
        self.weight = nn.Parameter(torch.zeros(L, self.filters, k))
        self.bias = nn.Parameter(torch.zeros(self.filters, self.out_h, self.out_w))
        self.activation = s.choice("activation", "logistic", ACTIVATIONS)
        self.act = activation_fn(self.activation)
        self.out_channels = self.filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C = x.shape[:2]
        if self.pad:
            x = F.pad(x, (self.pad,) * 4)
        # Patches by slicing (exports to ONNX, unlike unfold): (N, C, size*size, out_h, out_w).
        span_h, span_w = (self.out_h - 1) * self.stride + 1, (self.out_w - 1) * self.stride + 1
        patches = [
            x[:, :, dy : dy + span_h : self.stride, dx : dx + span_w : self.stride]
            for dy in range(self.size)
            for dx in range(self.size)
        ]
        cols = torch.stack(patches, dim=2)  # (N, C, size*size, out_h, out_w)
        L = self.out_h * self.out_w
        cols = cols.reshape(N, C * self.size * self.size, L).permute(2, 0, 1)  # (L, N, k)
        out = torch.bmm(cols, self.weight.transpose(1, 2))  # (L, N, n)
        out = out.permute(1, 2, 0).reshape(N, self.filters, self.out_h, self.out_w)
        return self.act(out + self.bias)

    def load(self, reader: WeightsReader) -> None:
        self.bias.copy_(reader.take(self.bias.numel()).view_as(self.bias))
        self.weight.copy_(reader.take(self.weight.numel()).view_as(self.weight))


class Connected(nn.Module):
    """``[connected]``: flatten (C, H, W order, as Darknet), linear, optional BN, activation."""

    def __init__(self, s: Section, inputs: int):
        super().__init__()
        self.outputs = s.get_int("output", 1)
        self.batch_normalize = bool(s.get_int("batch_normalize", 0))
        self.linear = nn.Linear(inputs, self.outputs)
        self.bn = DarknetBatchNorm(self.outputs) if self.batch_normalize else nn.Identity()
        self.activation = s.choice("activation", "logistic", ACTIVATIONS)
        self.act = activation_fn(self.activation)
        self.out_channels = self.outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.linear(x.flatten(1)))
        return self.act(y).view(-1, self.outputs, 1, 1)  # (N, outputs, 1, 1), as Darknet's shape

    def load(self, reader: WeightsReader) -> None:
        self.linear.bias.copy_(reader.take(self.outputs))
        w = reader.take(self.linear.weight.numel())
        if reader.transpose:  # stored inputs x outputs
            w = w.view(self.linear.in_features, self.outputs).t()
        self.linear.weight.copy_(w.reshape(self.outputs, -1))
        if self.batch_normalize:
            self.bn.weight.copy_(reader.take(self.outputs))
            self.bn.running_mean.copy_(reader.take(self.outputs))
            self.bn.running_var.copy_(reader.take(self.outputs))


class Dropout(nn.Module):
    def __init__(self, s: Section):
        super().__init__()
        self.drop = nn.Dropout(s.get_float("probability", 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x)


class Detection(nn.Module):
    """``[detection]`` (YOLOv1): the input as is, laid out ``[S*S*C classes][S*S*B conf]
    [S*S*B*4 boxes (x, y, sqrt w, sqrt h)]``; ``softmax=1`` normalises each cell's classes."""

    def __init__(self, s: Section, inputs: int):
        super().__init__()
        self.side, self.num = s.get_int("side", 7), s.get_int("num", 1)
        self.classes, self.coords = s.get_int("classes", 1), s.get_int("coords", 1)
        self.sqrt, self.softmax = bool(s.get_int("sqrt", 0)), bool(s.get_int("softmax", 0))
        if self.coords != 4:
            raise DarknetError(f"{s.where()}: coords={self.coords} is not supported (only 4)")
        expected = self.side * self.side * (self.classes + 5 * self.num)
        if inputs != expected:
            raise DarknetError(
                f"{s.where()}: the layer before gives {inputs} values, side={self.side}, "
                f"num={self.num}, classes={self.classes} need {expected}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.softmax:
            SS, C = self.side * self.side, self.classes
            cls = x[:, : SS * C].view(-1, SS, C).softmax(-1).flatten(1)
            x = torch.cat((cls, x[:, SS * C :]), dim=1)
        return x


class Route(nn.Module):
    """``[route]``: concatenate earlier outputs along channels (each split into ``groups``
    parts of which part ``group_id`` is kept)."""

    def __init__(self, s: Section, index: int, channels: list[int]):
        super().__init__()
        self.layers = [i if i >= 0 else index + i for i in s.ints("layers")]
        for i in self.layers:
            if not 0 <= i < index:
                raise DarknetError(f"{s.where()}: layer {i} is not an earlier layer")
        self.groups, self.group_id = s.get_int("groups", 1), s.get_int("group_id", 0)
        if not 0 <= self.group_id < self.groups:
            raise DarknetError(f"{s.where()}: group_id={self.group_id} with groups={self.groups}")
        self.out_channels = sum(channels[i] // self.groups for i in self.layers)

    def forward(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        parts = []
        for i in self.layers:
            x = outputs[i]
            part = x.shape[1] // self.groups
            parts.append(x[:, self.group_id * part : (self.group_id + 1) * part])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class Shortcut(nn.Module):
    """``[shortcut]``: ``activation(previous + outputs[from])`` (shapes must agree)."""

    def __init__(self, s: Section, index: int):
        super().__init__()
        _refuse(s, "weights_type", "none")
        sources = s.ints("from")
        if len(sources) != 1:
            raise DarknetError(f"{s.where()}: from={s.get('from')} names several layers")
        self.source = sources[0] if sources[0] >= 0 else index + sources[0]
        if not 0 <= self.source < index:
            raise DarknetError(f"{s.where()}: from={sources[0]} is not an earlier layer")
        self.act = activation_fn(s.choice("activation", "linear", ACTIVATIONS))

    def forward(self, x: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        return self.act(x + outputs[self.source])


class Upsample(nn.Module):
    def __init__(self, s: Section):
        super().__init__()
        self.stride, self.scale = s.get_int("stride", 2), s.get_float("scale", 1.0)
        if self.stride < 1:
            raise DarknetError(f"{s.where()}: stride={self.stride} (downsampling) is not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(x, scale_factor=self.stride, mode="nearest")
        return y * self.scale if self.scale != 1.0 else y


class Yolo(nn.Module):
    """``[yolo]``: Darknet's activations of one output scale (the input is returned as is;
    ``decode_yolo`` turns it into boxes)."""

    def __init__(self, s: Section, in_channels: int):
        super().__init__()
        _refuse(s, "new_coords", "0")
        self.classes = s.get_int("classes", 20)
        anchors = [float(v) for v in s.get("anchors", "").split(",") if v.strip()]
        total = s.get_int("num", len(anchors) // 2)
        mask = s.ints("mask") if s.get("mask") else list(range(total))
        if len(anchors) != 2 * total or any(not 0 <= m < total for m in mask):
            raise DarknetError(f"{s.where()}: anchors/mask/num disagree")
        self.register_buffer(
            "anchors", torch.tensor([anchors[2 * m : 2 * m + 2] for m in mask]), persistent=False
        )
        self.scale_x_y = s.get_float("scale_x_y", 1.0)
        if in_channels != len(mask) * (self.classes + 5):
            raise DarknetError(
                f"{s.where()}: {in_channels} input channels for {len(mask)} anchors and "
                f"{self.classes} classes (need {len(mask) * (self.classes + 5)})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# -- the network ---------------------------------------------------------------------------------


class WeightsReader:
    """Reads a ``.weights`` file: header, then float32 values in layer order."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise DarknetError(f"{self.path}: cannot read the weights ({exc})") from None
        if len(data) < 12:
            raise DarknetError(f"{self.path}: {len(data)} bytes is too short for a header")
        self.major, self.minor, self.revision = np.frombuffer(data[:12], dtype="<i4").tolist()
        # parser.c: `seen` is a size_t (8 bytes) from version 0.2 on, an int before.
        wide = self.major * 10 + self.minor >= 2 and self.major < 1000 and self.minor < 1000
        header = 20 if wide else 16
        if len(data) < header:
            raise DarknetError(f"{self.path}: {len(data)} bytes is too short for a header")
        self.seen = int(np.frombuffer(data[12:header], dtype="<i8" if wide else "<i4")[0])
        self.transpose = self.major > 1000 or self.minor > 1000
        body = data[header:]
        if len(body) % 4:
            raise DarknetError(f"{self.path}: {len(body)} bytes after the header is not float32s")
        self.values = torch.from_numpy(np.frombuffer(body, dtype="<f4").copy())
        self.offset = 0
        self.layer = "?"

    def take(self, count: int) -> torch.Tensor:
        end = self.offset + count
        if end > self.values.numel():
            raise DarknetError(
                f"{self.path}: too short: layer {self.layer} needs {count} more floats at float "
                f"{self.offset}, the file holds {self.values.numel()}"
            )
        out = self.values[self.offset : end]
        self.offset = end
        return out

    def finish(self) -> None:
        left = self.values.numel() - self.offset
        if left:
            raise DarknetError(
                f"{self.path}: too long: {left} floats left after the last layer "
                f"({self.offset} read of {self.values.numel()})"
            )


class DarknetNetwork(nn.Module):
    """A Darknet cfg as a PyTorch module.

    ``forward(images)`` takes (N, channels, height, width) RGB in [0, 1] and returns the outputs
    of the output layers (``[yolo]`` layers, a final ``[detection]``, or the last layer), in
    layer order. ``upto`` builds only layers ``0..upto`` (a backbone); the output is then that
    layer's.
    """

    def __init__(self, sections: list[Section], upto: int | None = None):
        super().__init__()
        net = sections[0]
        self.width, self.height = net.get_int("width", 0), net.get_int("height", 0)
        self.channels = net.get_int("channels", 3)
        if self.width <= 0 or self.height <= 0:
            raise DarknetError(f"{net.where()}: width and height must be set")
        layers = sections[1:]
        if upto is not None:
            if not 0 <= upto < len(layers):
                raise DarknetError(f"layer {upto} does not exist ({len(layers)} layers)")
            layers = layers[: upto + 1]
        self.complete = upto is None or upto == len(sections) - 2
        self.sections = [net, *layers]
        self.layers = nn.ModuleList()
        channels: list[int] = []
        sizes: list[tuple[int, int]] = []
        c, h, w = self.channels, self.height, self.width
        for index, s in enumerate(layers):
            module = self._build(s, index, c, h, w, channels, sizes)
            c, h, w = self._shape_after(module, s, c, h, w, channels, sizes)
            self.layers.append(module)
            channels.append(c)
            sizes.append((h, w))
        self.out_channels, self.out_size = c, (h, w)
        self.layer_channels, self.layer_sizes = channels, sizes  # of each layer's output
        kinds = [s.kind for s in layers]
        outs = [i for i, k in enumerate(kinds) if k == "yolo"]
        self.output_layers = outs or [len(layers) - 1]

    @staticmethod
    def _build(s, index, c, h, w, channels, sizes) -> nn.Module:
        kind = s.kind
        if kind == "convolutional":
            return Conv(s, c)
        if kind == "maxpool":
            return MaxPool(s)
        if kind == "local":
            return Local(s, c, h, w)
        if kind == "dropout":
            return Dropout(s)
        if kind == "connected":
            return Connected(s, c * h * w)
        if kind == "detection":
            return Detection(s, c * h * w)
        if kind == "route":
            module = Route(s, index, channels)
            first = sizes[module.layers[0]]
            if any(sizes[i] != first for i in module.layers):
                raise DarknetError(f"{s.where()}: routed layers differ in size")
            return module
        if kind == "shortcut":
            module = Shortcut(s, index)
            if channels[module.source] != c or sizes[module.source] != (h, w):
                raise DarknetError(f"{s.where()}: shortcut from a layer of another shape")
            return module
        if kind == "upsample":
            return Upsample(s)
        if kind == "yolo":
            return Yolo(s, c)
        raise DarknetError(f"{s.where()}: section [{kind}] cannot be a layer")

    @staticmethod
    def _shape_after(m, s, c, h, w, channels, sizes) -> tuple[int, int, int]:
        if isinstance(m, Conv):
            k, st, p = m.conv.kernel_size[0], m.conv.stride[0], m.conv.padding[0]
            return m.out_channels, (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
        if isinstance(m, MaxPool):
            return c, m.out_size(h), m.out_size(w)
        if isinstance(m, Local):
            return m.out_channels, m.out_h, m.out_w
        if isinstance(m, Connected):
            return m.outputs, 1, 1
        if isinstance(m, Detection):
            return c * h * w, 1, 1
        if isinstance(m, Route):
            return (m.out_channels, *sizes[m.layers[0]])
        if isinstance(m, Upsample):
            return c, h * m.stride, w * m.stride
        return c, h, w  # dropout, shortcut, yolo keep the shape

    def forward(
        self, images: torch.Tensor, start: int = 0, upto: int | None = None
    ) -> list[torch.Tensor]:
        """Run layers ``start..upto`` (default: all) and return the output layers' outputs.

        ``start > 0``: ``images`` is the output of layer ``start - 1`` (a cached prefix; see
        ``check_split``). ``upto``: stop after that layer and return ``[its output]``.
        """
        outputs: list[torch.Tensor | None] = [None] * start
        if start:
            outputs[start - 1] = images
        x = images
        last = len(self.layers) - 1 if upto is None else upto
        for index in range(start, last + 1):
            layer = self.layers[index]
            if isinstance(layer, Route):
                x = layer(outputs)
            elif isinstance(layer, Shortcut):
                x = layer(x, outputs)
            else:
                x = layer(x)
            outputs.append(x)
        if upto is not None:
            return [x]
        return [outputs[i] for i in self.output_layers]

    def check_split(self, start: int) -> None:
        """Raise ``ValueError`` unless layers ``start..`` need no output before ``start - 1``."""
        if not 0 < start < len(self.layers):
            raise ValueError(f"cannot split at layer {start}: layers are 0..{len(self.layers) - 1}")
        for index in range(start, len(self.layers)):
            layer = self.layers[index]
            sources = layer.layers if isinstance(layer, Route) else []
            sources = [layer.source] if isinstance(layer, Shortcut) else sources
            early = [i for i in sources if i < start - 1]
            if early:
                raise ValueError(
                    f"cannot split at layer {start}: layer {index} reads layer(s) {early}"
                )

    @torch.no_grad()
    def load_weights(self, path: str | Path) -> WeightsReader:
        """Fill the parameters from a Darknet ``.weights`` file; every byte must be used.

        The file may hold more layers than were built (``upto``): then only those are read
        and the rest is left unchecked. Nothing is modified unless the whole read succeeds.
        """
        reader = WeightsReader(path)
        staged = {k: v.clone() for k, v in self.state_dict().items()}
        try:
            for index, (s, layer) in enumerate(zip(self.sections[1:], self.layers, strict=True)):
                if hasattr(layer, "load"):
                    reader.layer = f"{index} [{s.kind}] ({s.where()})"
                    layer.load(reader)
            if self.complete:
                reader.finish()
        except DarknetError:
            self.load_state_dict(staged)
            raise
        return reader


def load_darknet(
    cfg: str | Path, weights: str | Path | None = None, upto: int | None = None
) -> DarknetNetwork:
    """Build the network a cfg describes (layers ``0..upto``) and load its weights, in eval mode.

    With ``upto``, the weights file is read only as far as those layers.
    """
    sections = read_cfg(cfg)
    full = DarknetNetwork(sections)  # validates the whole file and reads all bytes
    if weights is not None:
        full.load_weights(weights)
    if upto is None:
        return full.eval()
    part = DarknetNetwork(sections, upto=upto)
    state = full.state_dict()
    part.load_state_dict({k: state[k] for k in part.state_dict()})
    return part.eval()


# -- decoding ------------------------------------------------------------------------------------


def decode_yolo(
    network: DarknetNetwork, outputs: list[torch.Tensor], layers: Sequence[int] | None = None
) -> tuple[torch.Tensor, ...]:
    """Darknet's ``[yolo]`` decoding of every output scale (or of the ``[yolo]`` ``layers``
    whose raw outputs ``outputs`` are).

    Returns ``boxes`` (N, M, 4) xyxy normalised to the network input (not clipped),
    ``objectness`` (N, M) and ``class_probs`` (N, M, C), both after the logistic; Darknet's
    score of a class is ``objectness * class_prob``.
    """
    yolos = [network.layers[i] for i in (network.output_layers if layers is None else layers)]
    if not all(isinstance(y, Yolo) for y in yolos):
        raise ValueError("decode_yolo needs a network whose outputs are [yolo] layers")
    all_boxes, all_obj, all_cls = [], [], []
    for layer, x in zip(yolos, outputs, strict=True):
        N, _, h, w = x.shape
        A, C = layer.anchors.shape[0], layer.classes
        x = x.view(N, A, C + 5, h, w).permute(0, 1, 3, 4, 2)  # (N, A, h, w, C+5)
        s = layer.scale_x_y
        xy = x[..., :2].sigmoid() * s - 0.5 * (s - 1)
        cols = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, 1, w)
        rows = torch.arange(h, dtype=x.dtype, device=x.device).view(1, 1, h, 1)
        cx, cy = (xy[..., 0] + cols) / w, (xy[..., 1] + rows) / h
        anchors = layer.anchors.to(x.dtype).view(1, A, 1, 1, 2)
        bw = x[..., 2].exp() * anchors[..., 0] / network.width
        bh = x[..., 3].exp() * anchors[..., 1] / network.height
        boxes = torch.stack((cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), dim=-1)
        all_boxes.append(boxes.reshape(N, -1, 4))
        all_obj.append(x[..., 4].sigmoid().reshape(N, -1))
        all_cls.append(x[..., 5:].sigmoid().reshape(N, -1, C))
    return torch.cat(all_boxes, 1), torch.cat(all_obj, 1), torch.cat(all_cls, 1)


@torch.no_grad()
def detect_yolo(
    network: DarknetNetwork,
    images: torch.Tensor,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_detections: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """Run a ``[yolo]`` detector on (N, 3, height, width) RGB in [0, 1] and apply class-wise NMS.

    Returns one dict per image: ``boxes`` (K, 4) xyxy normalised to [0, 1] and clipped,
    ``scores`` (K,) decreasing, ``labels`` (K,), and ``class_probs`` (K, C) of each kept box.
    """
    boxes, obj, cls = decode_yolo(network, network(images))
    scores = obj.unsqueeze(-1) * cls  # (N, M, C)
    results = []
    for n in range(images.shape[0]):
        box_idx, labels = (scores[n] > conf_threshold).nonzero(as_tuple=True)
        b = boxes[n, box_idx].clamp(0, 1)
        sc = scores[n, box_idx, labels]
        keep = batched_nms(b, sc, labels, iou_threshold)[:max_detections]
        results.append(
            {
                "boxes": b[keep],
                "scores": sc[keep],
                "labels": labels[keep],
                "class_probs": cls[n, box_idx[keep]],
            }
        )
    return results
