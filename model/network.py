"""The YOLOv1 network: a DarkNet backbone built from a layer list, and a fully connected head.

The network returns the raw grid; decoding and NMS live in ``model.boxes`` and
``model.postprocess``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from model.config import ArchConfig, Layer, get_arch
from model.darknet import Conv as DarknetConv
from model.darknet import DarknetNetwork, Local, MaxPool, Section, activation_fn, parse_cfg

# ImageNet statistics: the usual input normalisation, stored in every checkpoint.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CNNBlock(nn.Module):
    """Conv2d without bias, BatchNorm2d, LeakyReLU(0.1): the seed's (and Darknet's) conv unit.

    Imported Darknet layers may instead have a bias and no BatchNorm, or another activation.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        padding: int,
        activation: str = "leaky",
        batch_normalize: bool = True,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel, stride, padding, bias=not batch_normalize
        )
        self.batchnorm = nn.BatchNorm2d(out_channels, eps=eps) if batch_normalize else nn.Identity()
        self.leakyrelu = activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.leakyrelu(self.batchnorm(self.conv(x)))


def _conv_block(in_channels: int, conv: tuple, eps: float) -> CNNBlock:
    kernel, filters, stride, padding, *rest = conv  # rest: (activation, batch_normalize)
    return CNNBlock(in_channels, filters, kernel, stride, padding, *rest, eps=eps)


def build_darknet(
    layers: tuple[Layer, ...], in_channels: int = 3, eps: float = 1e-5
) -> tuple[nn.Sequential, int]:
    """Build the backbone from a seed-style layer list; return it and its output channel count."""
    modules: list[nn.Module] = []
    channels = in_channels
    for layer in layers:
        if layer == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif isinstance(layer, tuple) and layer[0] == "M":
            _, size, stride, padding = layer
            modules.append(
                MaxPool(Section.of("maxpool", size=size, stride=stride, padding=padding))
            )
        elif isinstance(layer, tuple):
            modules.append(_conv_block(channels, layer, eps))
            channels = layer[1]
        elif isinstance(layer, list):
            *convs, repeats = layer
            for _ in range(repeats):
                for conv in convs:
                    modules.append(_conv_block(channels, conv, eps))
                    channels = conv[1]
        else:
            raise ValueError(f"unknown layer spec {layer!r}: expected a tuple, 'M' or a list")
    return nn.Sequential(*modules), channels


def output_size(modules: nn.Sequential, size: int) -> int:
    """The side of the (square) feature map that ``build_darknet``'s modules make of ``size``."""
    for module in modules:
        if isinstance(module, CNNBlock):
            (k, _), (stride, _), (pad, _) = (
                module.conv.kernel_size,
                module.conv.stride,
                module.conv.padding,
            )
            size = (size + 2 * pad - k) // stride + 1
        elif isinstance(module, nn.MaxPool2d):
            size = (size - module.kernel_size) // module.stride + 1
        elif isinstance(module, MaxPool):
            size = module.out_size(size)
    return size


class DarknetStem(nn.Module):
    """A Darknet cfg's layers (a pretrained backbone) as the first part of the network.

    With ``side_cfg_text`` a second cfg's layers (another pretrained backbone) run on the same
    image beside them, and the two last maps, the same size, are concatenated along the
    channels: the first's, then the side's. Its layers' indices are the side cfg's own; a split
    at layer ``L`` (``features``, ``forward_from``) cuts both cfgs after their layer ``L``.
    """

    def __init__(self, cfg_text: str, image_size: int, side_cfg_text: str | None = None):
        super().__init__()
        self.net = _sized_network(cfg_text, image_size, "darknet_cfg")
        self.side = None
        self.out_channels = self.net.out_channels
        if side_cfg_text is not None:
            self.side = _sized_network(side_cfg_text, image_size, "darknet_side_cfg")
            if self.side.out_size != self.net.out_size:
                raise ValueError(
                    f"the side backbone's {self.side.out_size} map is not the backbone's "
                    f"{self.net.out_size} at {image_size} px"
                )
            self.out_channels += self.side.out_channels

    @property
    def nets(self) -> list[DarknetNetwork]:
        return [self.net] if self.side is None else [self.net, self.side]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _concat([net(x)[-1] for net in self.nets])

    def features(self, x: torch.Tensor, upto: int) -> torch.Tensor:
        """Layer ``upto``'s output (of each cfg, concatenated): what ``forward_from`` takes."""
        return _concat([net(x, upto=upto)[0] for net in self.nets])

    def split(self, features: torch.Tensor, layer: int) -> list[torch.Tensor]:
        """``features`` of layer ``layer`` cut back into each cfg's part."""
        return list(features.split([net.layer_channels[layer] for net in self.nets], dim=1))

    def forward_from(self, features: torch.Tensor, layer: int) -> torch.Tensor:
        parts = self.split(features, layer)
        return _concat(
            [net(part, start=layer + 1)[-1] for net, part in zip(self.nets, parts, strict=True)]
        )

    def check_split(self, start: int) -> None:
        """Raise ``ValueError`` unless every cfg can be cut before ``start`` (their layer
        ``start - 1`` outputs the same size, so the cut's features concatenate)."""
        for net in self.nets:
            net.check_split(start)
        if len({net.layer_sizes[start - 1] for net in self.nets}) > 1:
            raise ValueError(f"cannot split at layer {start}: the two backbones' layer "
                             f"{start - 1} outputs differ in size")  # fmt: skip

    def layers_from(self, first: int) -> list[nn.Module]:
        """Every cfg's layers ``first..``."""
        return [layer for net in self.nets for layer in net.layers[first:]]


def _sized_network(cfg_text: str, image_size: int, field: str) -> DarknetNetwork:
    sections = parse_cfg(cfg_text, f"<architecture {field}>")
    sections[0].options.update(width=str(image_size), height=str(image_size))
    return DarknetNetwork(sections)


def _concat(maps: list[torch.Tensor]) -> torch.Tensor:
    return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)


class YOLOv1(nn.Module):
    """YOLOv1: input (N, 3, H, W) RGB in [0, 1], output the raw grid (N, S, S, C + 5B).

    Per cell the channels are ``[C class scores | conf, x, y, sqrt_w, sqrt_h] * B``; ``x, y`` are
    the box centre's offset in its cell, ``sqrt_w, sqrt_h`` the square roots of the size relative
    to the image. Row ``i`` of the grid runs along y, column ``j`` along x.
    """

    def __init__(
        self,
        arch: ArchConfig,
        num_classes: int = 20,
        boxes_per_cell: int = 2,
        image_size: int = 448,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ):
        super().__init__()
        if image_size <= 0 or image_size % arch.downsample:
            raise ValueError(
                f"image_size must be a positive multiple of {arch.downsample}, got {image_size}"
            )
        if num_classes < 1 or boxes_per_cell < 1:
            raise ValueError(
                f"num_classes and boxes_per_cell must be >= 1, got {num_classes}, {boxes_per_cell}"
            )
        self.arch = arch.name
        self.arch_config = arch
        self.num_classes = num_classes  # C
        self.boxes_per_cell = boxes_per_cell  # B
        self.image_size = image_size
        B, C = boxes_per_cell, num_classes
        # Normalisation is part of the network, so every backend sees the same [0, 1] input.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1))
        channels = 3
        self.stem = None
        if arch.darknet_cfg is not None:
            self.stem = DarknetStem(arch.darknet_cfg, image_size, arch.darknet_side_cfg)
            channels = self.stem.out_channels
        self.darknet, channels = build_darknet(arch.layers, channels, arch.batchnorm_eps)
        size = self.stem.net.out_size[0] if self.stem is not None else image_size
        # S in the paper: 448 / 64 = 7 for the seed's layers; a valid head conv on a stem's
        # 9 x 9 map (288 / 32) makes 7 too.
        self.grid_size = S = output_size(self.darknet, size)
        if S < 1:
            raise ValueError(f"image_size {image_size} leaves no grid ({S}x{S}) after the layers")
        self.local = None
        if arch.head_local is not None:
            size, filters, stride, pad, activation = arch.head_local
            section = Section.of(
                "local", size=size, filters=filters, stride=stride, pad=pad, activation=activation
            )
            self.local = Local(section, channels, S, S)
            if (self.local.out_h, self.local.out_w) != (S, S):
                raise ValueError(f"head_local {arch.head_local} changes the {S}x{S} grid")
            channels = filters
        outputs = S * S * (C + 5 * B)
        if arch.head_hidden:
            self.fcs = nn.Sequential(
                nn.Flatten(),
                nn.Linear(channels * S * S, arch.head_hidden),
                nn.Dropout(arch.head_dropout),
                activation_fn(arch.head_activation),
                nn.Linear(arch.head_hidden, outputs),
            )
        else:  # Darknet's yolov1.cfg and yolov1-tiny.cfg: straight to the output layer
            self.fcs = nn.Sequential(
                nn.Flatten(), nn.Dropout(arch.head_dropout), nn.Linear(channels * S * S, outputs)
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.pixel_mean) / self.pixel_std
        if self.stem is not None:
            x = self.stem(x)
        return self.head(x)

    def stem_features(self, images: torch.Tensor, upto: int) -> torch.Tensor:
        """The Darknet stem's layer ``upto`` output: what ``forward_from`` continues from."""
        x = (images - self.pixel_mean) / self.pixel_std
        return self.stem.features(x, upto)

    def forward_from(self, features: torch.Tensor, layer: int) -> torch.Tensor:
        """``forward`` from the output of stem layer ``layer`` (cached features) onwards."""
        return self.head(self.stem.forward_from(features, layer))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.darknet(x)  # (N, channels, S, S)
        if self.local is not None:
            x = self.local(x)  # (N, filters, S, S)
        S = self.grid_size
        return self.fcs(x).view(
            -1, S, S, self.num_classes + 5 * self.boxes_per_cell
        )  # (N,S,S,C+5B)


def cell_output_layer(model: YOLOv1) -> nn.Linear:
    """The connected output layer, when it reads the S x S map directly (no hidden layer).

    Its weight is then (S*S*(C+5B), channels*S*S): output ``(i*S + j)*(C+5B) + o`` of cell
    (i, j) and input ``k*S*S + i*S + j`` of channel k at cell (i, j) (``nn.Flatten`` of NCHW).
    """
    linear = model.fcs[-1]
    cells = model.grid_size**2
    if model.arch_config.head_hidden or not isinstance(linear, nn.Linear):
        raise ValueError("the output layer reads a hidden layer, not the grid (--head-hidden 0)")
    if linear.in_features % cells or linear.out_features % cells:
        raise ValueError(f"the output layer's {linear.in_features} inputs are not {cells} cells")
    return linear


@torch.no_grad()
def share_cells(linear: nn.Linear, S: int, fresh: bool = False) -> None:
    """Make the connected output layer a 1 x 1 convolution over the S x S map, in place.

    Every cell's outputs then read only that cell's channels, with the same weights and bias in
    every cell: the weight is block-diagonal over cells, each block the mean of the layer's
    current blocks (``fresh``: a new random block, initialised as ``nn.Linear`` initialises a
    layer with one cell's inputs). The layer keeps its shape, so whatever reads or saves it is
    unchanged; training may later let the other weights grow.
    """
    P = S * S
    D, K = linear.out_features // P, linear.in_features // P
    weight = linear.weight.view(P, D, K, P)
    if fresh:
        block = nn.Linear(K, D, device=weight.device)
        shared_w, shared_b = block.weight.to(weight.dtype), block.bias.to(weight.dtype)
    else:
        shared_w = torch.diagonal(weight, dim1=0, dim2=3).mean(-1)  # (D, K)
        shared_b = linear.bias.view(P, D).mean(0)
    weight.zero_()
    torch.diagonal(weight, dim1=0, dim2=3).copy_(shared_w.unsqueeze(-1).expand(D, K, P))
    linear.bias.copy_(shared_b.repeat(P))


def build_model(
    arch: str = "yolov1",
    num_classes: int = 20,
    boxes_per_cell: int = 2,
    image_size: int = 448,
) -> YOLOv1:
    """Build a named architecture (``yolov1``, ``yolov1-paper``, ``yolov1-tiny``)."""
    return YOLOv1(get_arch(arch), num_classes, boxes_per_cell, image_size)


def fold_batchnorm(model: YOLOv1) -> YOLOv1:
    """Return an eval-mode copy whose BatchNorms are folded into the preceding convolutions.

    Folding an already folded model is a no-op copy.
    """
    folded = copy.deepcopy(model).eval()
    for block in folded.modules():
        if isinstance(block, CNNBlock) and isinstance(block.batchnorm, nn.BatchNorm2d):
            block.conv = fuse_conv_bn_eval(block.conv, block.batchnorm)
            block.batchnorm = nn.Identity()
        elif isinstance(block, DarknetConv):
            block.fold()
    return folded


def prepare_for_inference(
    model: YOLOv1, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> YOLOv1:
    """Fold BatchNorm, switch to eval and channels_last, and move to ``device``/``dtype``.

    ``dtype`` may be float16 or bfloat16 on CUDA; the input must then have the same dtype.
    """
    device = torch.device(device)
    if dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"dtype {dtype} is only supported on CUDA, got device {device}")
    ready = fold_batchnorm(model).to(device=device, dtype=dtype)
    ready = ready.to(memory_format=torch.channels_last)
    for p in ready.parameters():
        p.requires_grad_(False)
    return ready
