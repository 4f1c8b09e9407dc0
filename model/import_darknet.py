"""Convert a Darknet YOLOv1 (``yolov1.cfg`` + ``yolov1.weights``, Fast YOLO ...) to a checkpoint.

`yolov1-import --cfg yolov1.cfg --weights yolov1.weights --out weights/yolov1-darknet.safetensors`

The cfg's convolutional and max-pool layers become the layer list (seed form), ``[local]``,
``[dropout]`` and the connected layers become the head, and the last connected layer's rows are
permuted from Darknet's detection layout ``[S*S*C classes][S*S*B conf][S*S*B*4 boxes]`` to ours,
per cell ``[C | conf, x, y, sqrt_w, sqrt_h] * B``, so the imported model runs through the same
decoding, NMS and service code and gives the boxes Darknet gives. Darknet feeds RGB in [0, 1]
after a plain resize: the checkpoint records that (mean 0, std 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import save_checkpoint
from model.config import VOC_CLASSES, ArchConfig
from model.darknet import (
    DARKNET_BN_EPS,
    Connected,
    Conv,
    DarknetError,
    DarknetNetwork,
    Detection,
    Dropout,
    Local,
    MaxPool,
    read_cfg,
)
from model.data import load_class_names
from model.metadata import file_sha256
from model.network import CNNBlock, YOLOv1

logger = logging.getLogger(__name__)

# Darknet's `detector test` threshold for YOLOv1 (src/yolo.c: thresh .2).
DARKNET_V1_THRESHOLD = 0.2


def detection_permutation(S: int, B: int, C: int) -> torch.Tensor:
    """``perm[ours] = darknet``: the Darknet output index of each value of our (S, S, C+5B) grid.

    Darknet (``detection_layer.c``), for cell ``i = row * S + col``: class ``j`` at ``i*C + j``,
    the confidence of box ``n`` at ``S*S*C + i*B + n``, its coordinate ``k`` at
    ``S*S*(C+B) + (i*B + n)*4 + k``.
    """
    perm = torch.empty(S * S * (C + 5 * B), dtype=torch.long)
    for i in range(S * S):
        base = i * (C + 5 * B)
        for j in range(C):
            perm[base + j] = i * C + j
        for n in range(B):
            perm[base + C + 5 * n] = S * S * C + i * B + n
            for k in range(4):
                perm[base + C + 5 * n + 1 + k] = S * S * (C + B) + (i * B + n) * 4 + k
    return perm


def _conv_spec(layer: Conv, where: str) -> tuple:
    conv = layer.conv
    if conv.groups != 1:
        raise DarknetError(f"{where}: groups={conv.groups}: YOLOv1 convolutions are not grouped")
    act = layer.activation
    spec = (conv.kernel_size[0], conv.out_channels, conv.stride[0], conv.padding[0])
    if act == "leaky" and layer.batch_normalize:
        return spec
    return (*spec, act, layer.batch_normalize)


def yolov1_from_darknet(
    net: DarknetNetwork, class_names: list[str] | None = None
) -> tuple[YOLOv1, dict[str, Any]]:
    """Our YOLOv1 with the weights of a loaded Darknet YOLOv1 network, and a summary."""
    sections = net.sections[1:]
    layers = list(zip(sections, net.layers, strict=True))
    if not layers or not isinstance(layers[-1][1], Detection):
        raise DarknetError("a YOLOv1 cfg ends with a [detection] layer")
    detection: Detection = layers[-1][1]
    if not detection.sqrt:
        raise DarknetError(f"{sections[-1].where()}: sqrt=0 is not supported (our boxes are sqrt)")
    if detection.softmax:
        raise DarknetError(f"{sections[-1].where()}: softmax=1 is not supported")
    S, B, C = detection.side, detection.num, detection.classes
    if net.width != net.height or net.width % S:
        raise DarknetError(f"input {net.width}x{net.height} is not square and a multiple of {S}")
    backbone: list[tuple] = []
    convs: list[Conv] = []
    head_local, local_module, dropout, connected = None, None, 0.0, []
    for s, layer in layers[:-1]:
        in_head = local_module is not None or dropout or connected
        if isinstance(layer, (Conv, MaxPool)) and in_head:
            raise DarknetError(f"{s.where()}: a [{s.kind}] after the head is not a YOLOv1 layout")
        if isinstance(layer, Conv):
            backbone.append(_conv_spec(layer, s.where()))
            convs.append(layer)
        elif isinstance(layer, MaxPool):
            backbone.append(("M", layer.size, layer.stride, layer.padding))
        elif isinstance(layer, Local) and local_module is None and not connected:
            act = layer.activation
            head_local = (layer.size, layer.filters, layer.stride, layer.pad, act)
            local_module = layer
        elif isinstance(layer, Dropout):
            dropout = max(dropout, layer.drop.p)
        elif isinstance(layer, Connected) and len(connected) < 2:
            if layer.batch_normalize:
                raise DarknetError(f"{s.where()}: batch-normalised [connected] is not supported")
            connected.append(layer)
        else:
            raise DarknetError(f"{s.where()}: [{s.kind}] here is not a YOLOv1 layout")
    if not connected or connected[-1].activation != "linear":
        raise DarknetError("the last [connected] layer before [detection] must be linear")
    hidden = connected[0] if len(connected) == 2 else None
    arch = ArchConfig(
        name=f"darknet-{Path(net.sections[0].source).stem}",
        layers=tuple(backbone),
        head_hidden=0 if hidden is None else hidden.outputs,
        head_dropout=dropout,
        downsample=net.width // S,
        head_local=head_local,
        head_activation="leaky" if hidden is None else hidden.activation,
        batchnorm_eps=0.0,  # with the variance stored as (sqrt(var) + 1e-6)^2: Darknet exactly
    )
    arch.validate()
    names = list(class_names) if class_names else list(VOC_CLASSES)
    if len(names) != C:
        raise DarknetError(f"the cfg has {C} classes, {len(names)} class names were given")
    model = YOLOv1(arch, C, B, net.width, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    if model.grid_size != S:
        raise DarknetError(f"the layers give a {model.grid_size}x{model.grid_size} grid, not {S}")
    _copy_weights(model, convs, local_module, hidden, connected[-1], S, B, C)
    return model.eval(), {"S": S, "B": B, "C": C, "input_size": net.width, "class_names": names}


@torch.no_grad()
def _copy_weights(model, convs, local, hidden, output, S, B, C) -> None:
    blocks = [m for m in model.darknet if isinstance(m, CNNBlock)]
    if len(blocks) != len(convs):
        raise DarknetError(f"{len(convs)} convolutions but {len(blocks)} blocks were built")
    for block, conv in zip(blocks, convs, strict=True):
        block.conv.weight.copy_(conv.conv.weight)
        if conv.batch_normalize:
            bn, src = block.batchnorm, conv.bn
            bn.weight.copy_(src.weight)
            bn.bias.copy_(src.bias)
            bn.running_mean.copy_(src.running_mean)
            bn.running_var.copy_((src.running_var.sqrt() + DARKNET_BN_EPS).square())
        else:
            block.conv.bias.copy_(conv.conv.bias)
    if local is not None:
        model.local.load_state_dict(local.state_dict())
    linears = [m for m in model.fcs if isinstance(m, torch.nn.Linear)]
    if hidden is not None:
        linears[0].load_state_dict(hidden.linear.state_dict())
    perm = detection_permutation(S, B, C)
    linears[-1].weight.copy_(output.linear.weight[perm])
    linears[-1].bias.copy_(output.linear.bias[perm])


def import_darknet(
    cfg: Path, weights: Path, out: Path, class_names: list[str] | None = None
) -> dict[str, Any]:
    """Read, convert and write atomically; return the summary that the CLI prints."""
    net = DarknetNetwork(read_cfg(cfg))
    reader = net.load_weights(weights)
    model, info = yolov1_from_darknet(net.eval(), class_names)
    source = {
        "format": "darknet",
        "cfg": cfg.name,
        "cfg_sha256": file_sha256(cfg),
        "weights": weights.name,
        "weights_sha256": file_sha256(weights),
        "header": {"major": reader.major, "minor": reader.minor, "revision": reader.revision,
                   "seen": reader.seen},
    }  # fmt: skip
    meta = {
        "class_names": info["class_names"],
        "conf_threshold": DARKNET_V1_THRESHOLD,
        "source": source,
    }
    save_checkpoint(out, model, meta)
    return {
        "layers": len(net.layers),
        "parameters": sum(p.numel() for p in model.parameters()),
        **{k: info[k] for k in ("S", "B", "C", "input_size")},
        "cfg_sha256": source["cfg_sha256"],
        "weights_sha256": source["weights_sha256"],
        "out": str(out),
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("yolov1-import", description=__doc__.splitlines()[0])
    p.add_argument("--cfg", required=True, type=Path, help="Darknet .cfg (e.g. yolov1.cfg)")
    p.add_argument("--weights", required=True, type=Path, help="Darknet .weights")
    p.add_argument("--out", required=True, type=Path, help="the .safetensors checkpoint to write")
    p.add_argument("--class-names", type=Path, help="one name per line (default: the 20 VOC)")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    names = load_class_names(args.class_names) if args.class_names else None
    summary = import_darknet(args.cfg, args.weights, args.out, names)
    for key, value in summary.items():
        print(f"{key:>15}: {value}")
    return summary


def cli(argv: list[str] | None = None) -> None:
    """Console entry point: errors are one line on stderr, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (DarknetError, ValueError, OSError) as exc:
        print(f"yolov1-import: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
