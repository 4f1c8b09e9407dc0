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

# ImageNet statistics: the usual input normalisation, stored in every checkpoint.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CNNBlock(nn.Module):
    """Conv2d without bias, BatchNorm2d, LeakyReLU(0.1): the seed's (and Darknet's) conv unit."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False)
        self.batchnorm = nn.BatchNorm2d(out_channels)
        self.leakyrelu = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.leakyrelu(self.batchnorm(self.conv(x)))


def build_darknet(layers: tuple[Layer, ...], in_channels: int = 3) -> tuple[nn.Sequential, int]:
    """Build the backbone from a seed-style layer list; return it and its output channel count."""
    modules: list[nn.Module] = []
    channels = in_channels
    for layer in layers:
        if isinstance(layer, tuple):
            kernel, filters, stride, padding = layer
            modules.append(CNNBlock(channels, filters, kernel, stride, padding))
            channels = filters
        elif layer == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif isinstance(layer, list):
            *convs, repeats = layer
            for _ in range(repeats):
                for kernel, filters, stride, padding in convs:
                    modules.append(CNNBlock(channels, filters, kernel, stride, padding))
                    channels = filters
        else:
            raise ValueError(f"unknown layer spec {layer!r}: expected a tuple, 'M' or a list")
    return nn.Sequential(*modules), channels


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
        self.num_classes = num_classes  # C
        self.boxes_per_cell = boxes_per_cell  # B
        self.image_size = image_size
        self.grid_size = image_size // arch.downsample  # S in the paper
        S, B, C = self.grid_size, boxes_per_cell, num_classes
        # Normalisation is part of the network, so every backend sees the same [0, 1] input.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1))
        self.darknet, channels = build_darknet(arch.layers)
        self.fcs = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * S * S, arch.head_hidden),
            nn.Dropout(arch.head_dropout),
            nn.LeakyReLU(0.1),
            nn.Linear(arch.head_hidden, S * S * (C + 5 * B)),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.pixel_mean) / self.pixel_std
        x = self.darknet(x)  # (N, channels, S, S)
        S = self.grid_size
        return self.fcs(x).view(
            -1, S, S, self.num_classes + 5 * self.boxes_per_cell
        )  # (N,S,S,C+5B)


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
