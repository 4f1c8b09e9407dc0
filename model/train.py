"""Train YOLOv1 on Pascal VOC or YOLO-txt data: `yolov1-train --data ROOT ... --out W.safetensors`.

Writes, beside ``--out``: the best checkpoint by val mAP@0.5 (``--out`` itself, servable), the
last one (``*.last.safetensors``), the resumable state (``*.state.pt``: optimizer, scheduler,
epoch, RNG) and a CSV log. Multi-GPU: ``torchrun --nproc_per_node=N -m model.train ...``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset
from tqdm import tqdm

from model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_metadata,
    save_checkpoint,
)
from model.config import ARCHITECTURES, VOC_CLASSES, ArchConfig
from model.darknet import (
    DarknetError,
    Section,
    ancestors,
    load_darknet,
    prune_layers,
    read_cfg,
    sections_to_text,
)
from model.data import (
    Annotation,
    DetectionDataset,
    detection_collate,
    load_class_names,
    read_datasets,
    target_grid,
)
from model.distill import DenseTeacher, boxed_targets, mix_dense, same_prefix
from model.evaluate import predict, resolve_device, score
from model.feature_cache import Views, load_or_compute
from model.loss import YOLOv1Loss
from model.metadata import read_metadata
from model.network import YOLOv1, build_model, cell_output_layer, share_cells
from model.teacher import (
    class_mapping,
    drop_foreign_boxes,
    fill_unlabelled_objects,
    foreign_objects,
    label_images,
    list_unlabeled,
    load_teachers,
    teacher_annotation,
)

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became non-finite)."""


@dataclass(frozen=True)
class GridCollate:
    """Collate a batch and encode its boxes as (N, S, S, C + 5) grid targets (picklable);
    difficult objects are not targets (``target_grid``)."""

    S: int
    C: int

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = detection_collate(batch)
        grids = [target_grid(t, self.S, self.C) for t in targets]
        return images, torch.stack(grids)  # (N, 3, H, W), (N, S, S, C+5)


def lr_factor(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float, schedule: str):
    """Multiplier of the base learning rate at optimizer step ``step``.

    Warm-up rises linearly from 0.1x to 1x (the paper's 1e-3 -> 1e-2). ``step``: /10 at 75/135 and
    again at 105/135 of the run, as the paper; ``cosine``: cosine decay to 1% after warm-up.
    """
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        return 0.1 + 0.9 * step / warmup_steps
    progress = step / (epochs * steps_per_epoch)
    if schedule == "cosine":
        rest = (step - warmup_steps) / max(1.0, epochs * steps_per_epoch - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(rest, 1.0)))
    return 1.0 if progress < 75 / 135 else 0.1 if progress < 105 / 135 else 0.01


def ema_average(decay: float):
    """``AveragedModel``'s ``multi_avg_fn`` for an exponential moving average of the weights.

    Its decay warms up as min(``decay``, (1 + n) / (10 + n)) after n updates (TensorFlow's
    ``num_updates`` rule), so the first weights, a fresh head's random ones, fade fast.
    Integer buffers (BatchNorm's batch counter) take the model's value.
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor):
        weight = 1.0 - min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        for avg, cur in zip(averaged, current, strict=True):
            if avg.is_floating_point():
                avg.lerp_(cur, weight)
            else:
                avg.copy_(cur)

    return update


def output_paths(out: Path) -> dict[str, Path]:
    stem = out.name.removesuffix(".safetensors")
    return {
        "best": out,
        "last": out.with_name(f"{stem}.last.safetensors"),
        "state": out.with_name(f"{stem}.state.pt"),
        "csv": out.with_name(f"{stem}.csv"),
        "class_csv": out.with_name(f"{stem}.classes.csv"),  # each class's val AP by epoch
    }


def init_from(model: YOLOv1, path: Path) -> set[str]:
    """Copy every tensor of a checkpoint whose name and shape match (e.g. all but a new head);
    return the names of those copied.

    A tensor that grew keeps the checkpoint's values in its leading block. What it gained in
    dimension 1 (inputs: a conv after a route that now concatenates more channels after the old
    ones, a connected layer after a wider hidden layer) starts at zero; what it gained in
    dimension 0 (outputs: the new units of a wider hidden layer) keeps its fresh initialisation.
    A layer's new outputs then reach only weights that start at zero, so the network starts
    as the checkpoint's and learns to use what was added.
    """
    source, _ = load_checkpoint(path)
    own = model.state_dict()
    copied, grown = {}, []
    for k, v in source.state_dict().items():
        if k not in own:
            continue
        if own[k].shape == v.shape:
            copied[k] = v
        elif _grew(own[k].shape, v.shape):
            copied[k] = own[k].clone()
            if own[k].ndim >= 2:
                copied[k][:, v.shape[1] :] = 0
            copied[k][tuple(slice(0, n) for n in v.shape)] = v
            grown.append(k)
    skipped = sorted(set(own) - set(copied))
    model.load_state_dict(copied, strict=False)
    logger.info(
        "initialised %d tensors from %s (%d grown, new inputs at zero: %s); kept %d new",
        len(copied), path, len(grown), ", ".join(grown) or "-", len(skipped),
    )  # fmt: skip
    return set(copied)


def _grew(own: torch.Size, old: torch.Size) -> bool:
    """Whether ``old`` fits in ``own``'s leading block, larger only in dimensions 0 and 1."""
    if len(own) != len(old) or own[2:] != old[2:]:
        return False
    return all(a >= b for a, b in zip(own, old, strict=True)) and own[:2] != old[:2]


# The head put on a pretrained Darknet backbone (--backbone): one 3x3 conv to adapt the features,
# then the YOLOv1 connected layers. Dropout 0.3: the labelled set is small.
STUDENT_HEAD_FILTERS = 256
STUDENT_HEAD_HIDDEN = 496  # the seed's hidden connected layer; 0: none (Darknet's yolov1.cfg)
STUDENT_HEAD_DROPOUT = 0.3
STUDENT_FINE_FILTERS = 128  # the --backbone-fine-layer branch's 2 x 2 stride-2 conv


def backbone_arch(
    cfg: Path,
    layer: int,
    dropout: float = STUDENT_HEAD_DROPOUT,
    valid_head: bool = False,
    kernel: int = 3,
    fine_layer: int | None = None,
    hidden: int = STUDENT_HEAD_HIDDEN,
    filters: int = STUDENT_HEAD_FILTERS,
    side: Path | None = None,
) -> ArchConfig:
    """A YOLOv1 whose backbone is a Darknet cfg's layers ``0..layer`` (a stride-32 feature map).

    The head's conv is ``kernel`` x ``kernel``, padded to keep the map's size, or with
    ``valid_head`` not padded, so that the grid is the map less ``kernel - 1``: a larger input
    keeps the 7 x 7 grid (288 px: a 9 x 9 map and a 3 x 3 conv; 352 px: 11 x 11 and 5 x 5).

    ``fine_layer``: also a later layer of twice the resolution (a detector's stride-16 branch;
    the cfg keeps the layers it depends on and drops the rest), brought to the stride-32 map's
    size by a 2 x 2 stride-2 conv and concatenated after ``layer``'s channels: the head sees
    finer detail (YOLOv2's passthrough idea) and the grid stays 7 x 7.

    ``side``: a second cfg whose layers ``0..layer`` run beside the first's on the same image
    (another pretrained backbone; its map must be the same size), their channels concatenated
    after the first's (``ArchConfig.darknet_side_cfg``).
    """
    if kernel < 1 or (not valid_head and kernel % 2 == 0):
        raise ValueError(f"head kernel {kernel}: must be >= 1, and odd unless the conv is valid")
    if filters < 1 or hidden < 0:
        raise ValueError(f"head: {filters} conv filters (must be >= 1), hidden {hidden} (>= 0)")
    sections = read_cfg(cfg)
    backbone = _prefix(sections, layer, cfg)
    side_cfg = None
    if side is not None:
        if fine_layer is not None:
            raise ValueError("--backbone-side and --backbone-fine-layer cannot be combined")
        side_cfg = sections_to_text(_prefix(read_cfg(side), layer, side))
    last = len(sections) - 2
    if fine_layer is not None:
        if not layer < fine_layer <= last:
            raise ValueError(f"--backbone-fine-layer {fine_layer}: must be in {layer + 1}..{last}")
        backbone, index = prune_layers(sections, student_layers(sections, layer, fine_layer))
        backbone += [
            Section.of(
                "convolutional",
                batch_normalize=1,
                filters=STUDENT_FINE_FILTERS,
                size=2,
                stride=2,
                pad=0,
                activation="leaky",
            ),
            Section.of("route", layers=f"{index[layer]},-1"),
        ]
    pad = 0 if valid_head else kernel // 2
    name = f"yolov1-{cfg.stem}" + ("-fine" if fine_layer is not None else "")
    return ArchConfig(
        name=name + ("" if side is None else f"+{side.stem}"),
        layers=((kernel, filters, 1, pad),),
        head_hidden=hidden,
        head_dropout=dropout,
        downsample=32,
        darknet_cfg=sections_to_text(backbone),
        darknet_side_cfg=side_cfg,
    )


def _prefix(sections: list[Section], layer: int, cfg: Path) -> list[Section]:
    last = len(sections) - 2
    if not 0 <= layer < last + 1:
        raise ValueError(f"--backbone-layer {layer}: {cfg} has layers 0..{last}")
    return sections[: layer + 2]


def student_layers(sections: list[Section], layer: int, fine: int | None) -> set[int]:
    """The cfg layers a ``backbone_arch`` stem keeps: ``0..layer`` and what ``fine`` reads."""
    return set(range(layer + 1)) | (ancestors(sections, fine) if fine is not None else set())


def load_backbone(
    model: YOLOv1,
    cfg: Path,
    weights: Path,
    layer: int,
    fine: int | None,
    side: tuple[Path, Path] | None = None,
) -> None:
    """Fill ``model``'s stem (``backbone_arch``) with the pretrained layers of a Darknet file,
    and its side backbone with ``side``'s (CFG, WEIGHTS) layers ``0..layer``."""
    if side is not None:
        model.stem.side.load_state_dict(load_darknet(*side, upto=layer).state_dict())
    darknet = load_darknet(cfg, weights, upto=fine if fine is not None else layer)
    keep = sorted(student_layers(darknet.sections, layer, fine))
    index = {old: new for new, old in enumerate(keep)}  # as prune_layers renumbers
    state = {}
    for key, value in darknet.state_dict().items():
        old, rest = key.split(".", 2)[1:]
        if int(old) in index:
            state[f"layers.{index[int(old)]}.{rest}"] = value
    missing, _ = model.stem.net.load_state_dict(state, strict=False)
    new = {int(k.split(".")[1]) for k in missing}
    if new - {len(index)}:  # only the fine branch's 2 x 2 conv starts untrained
        raise ValueError(f"backbone layers {sorted(new)} found no pretrained weights")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("yolov1-train", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, nargs="+", type=Path, help="dataset root(s)")
    p.add_argument("--format", choices=("voc", "yolo"), default="voc")
    p.add_argument("--class-names", type=Path, help="file with one class name per line (def: VOC)")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--val-data", nargs="+", type=Path, help="val root(s) (default: --data)")
    p.add_argument(
        "--arch", choices=sorted(ARCHITECTURES),
        help="built-in architecture (default: yolov1, or --init's own architecture)",
    )  # fmt: skip
    p.add_argument(
        "--backbone", nargs=2, type=Path, metavar=("CFG", "WEIGHTS"),
        help="a pretrained Darknet backbone: the cfg's layers up to --backbone-layer, then the "
        "YOLOv1 head (input normalisation: none, as Darknet)",
    )  # fmt: skip
    p.add_argument("--backbone-layer", type=int, help="last backbone layer (Darknet's index)")
    p.add_argument(
        "--backbone-side", nargs=2, type=Path, metavar=("CFG", "WEIGHTS"),
        help="a second pretrained Darknet backbone run beside --backbone on the same image: "
        "its layers up to --backbone-layer (a map of the same size), whose channels the head "
        "reads after --backbone's; --train-from-layer and the cache cut both at that index",
    )  # fmt: skip
    p.add_argument(
        "--backbone-fine-layer", type=int,
        help="also route this later stride-16 layer of the cfg (with the layers it needs) into "
        "the head, downsampled by a 2x2 stride-2 conv and concatenated to --backbone-layer's map",
    )  # fmt: skip
    p.add_argument(
        "--head-dropout", type=float, default=STUDENT_HEAD_DROPOUT,
        help="dropout of the head put on a --backbone",
    )  # fmt: skip
    p.add_argument(
        "--valid-head-conv", action="store_true",
        help="the --backbone head's conv without padding: the grid is the stride-32 map less "
        "--head-kernel - 1 (--img-size 288 and kernel 3: the 7x7 grid)",
    )  # fmt: skip
    p.add_argument("--head-kernel", type=int, default=3, help="the --backbone head conv's size")
    p.add_argument("--head-filters", type=int, default=STUDENT_HEAD_FILTERS, help="its filters")
    p.add_argument(
        "--head-hidden", type=int, default=STUDENT_HEAD_HIDDEN,
        help="width of the --backbone head's hidden connected layer (the seed's 496, the paper's "
        "4096; 0: none, the conv straight into the output layer, as Darknet's yolov1.cfg)",
    )  # fmt: skip
    p.add_argument(
        "--shared-cell-epochs", type=int, default=0, metavar="N",
        help="train the connected output layer as a 1x1 convolution for the first N epochs "
        "(each cell reads only its own column of the map, the same weights in every cell; it "
        "starts fresh), then as the full connected layer; needs --head-hidden 0",
    )  # fmt: skip
    p.add_argument(
        "--freeze-backbone-epochs", type=int, default=0,
        help="train only the head for this many epochs first",
    )  # fmt: skip
    p.add_argument(
        "--backbone-lr-scale", type=float, default=1.0,
        help="learning rate of the --backbone layers relative to --lr",
    )  # fmt: skip
    p.add_argument(
        "--teacher", nargs="+", action="append", metavar="CFG WEIGHTS | CKPT",
        help="a pretrained detector that labels the --unlabeled images; given more than once "
        "(Darknet detectors), the teachers vote on each box",
    )  # fmt: skip
    p.add_argument("--teacher-names", type=Path, help="the teacher's class names (default: VOC)")
    p.add_argument("--teacher-threshold", type=float, default=0.3)
    p.add_argument(
        "--teacher-fill",
        action="store_true",
        help="also add teacher boxes for objects the annotations miss on labelled images",
    )
    p.add_argument(
        "--keep-foreign-boxes",
        action="store_true",
        help="keep teacher boxes on objects that an --unlabeled VOC root annotates with a class "
        "the student lacks (default: drop them, so those objects train as background)",
    )
    p.add_argument(
        "--soft-targets", action="store_true",
        help="the teacher's class distribution and objectness as the targets of its boxes",
    )  # fmt: skip
    p.add_argument(
        "--unlabeled", nargs="+", type=Path, default=[],
        help="folders of images without labels (a VOC root gives its --train-split images)",
    )  # fmt: skip
    p.add_argument("--label-cache", type=Path, help="teacher label cache (default: beside --out)")
    p.add_argument(
        "--distill-dense", type=float, default=0.0, metavar="W",
        help="with --cache-views, when the cached layers are the (first) Darknet teacher's own: "
        "weight of a class term in the cells without a target object, whose target is the "
        "teacher's output run on the cached features (model.distill; 0: off)",
    )  # fmt: skip
    p.add_argument(
        "--distill-dense-side", type=float, default=None, metavar="F",
        help="with --backbone-side and --distill-dense: the share of the side backbone's "
        "teacher in the dense term, the first's the rest (default 0.5: their mean)",
    )  # fmt: skip
    p.add_argument(
        "--distill-dense-boxes", action="store_true",
        help="with --distill-dense: in a cell whose centre lies in a target box (annotated, or "
        "the teachers' on unlabelled images), the dense term's target is that box's class at "
        "full weight, not the teacher head's class scores",
    )  # fmt: skip
    p.add_argument(
        "--cache-views", type=int, default=0,
        help="train on cached --backbone features of this many views per image (plain, "
        "mirrored, augmented); needs --train-from-layer",
    )  # fmt: skip
    p.add_argument(
        "--cache-mosaic-views", type=int, default=0, metavar="M",
        help="with --cache-views: M more cached views per image, each a 2x2 mosaic of it and "
        "three random images through the training augmentation",
    )  # fmt: skip
    p.add_argument(
        "--train-from-layer", type=int,
        help="with --cache-views: the first backbone layer that trains (earlier ones are cached)",
    )  # fmt: skip
    p.add_argument(
        "--img-size",
        type=int,
        default=448,
        help="input side: a multiple of the stride (64; 32 with --backbone)",
    )
    p.add_argument("--boxes-per-cell", type=int, default=2)
    p.add_argument("--epochs", type=int, default=135)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate after warm-up")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=("step", "cosine"), default="step")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--clip-grad", type=float, default=10.0, help="max gradient norm")
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="evaluate and save an exponential moving average of the weights with this decay "
        "per step (e.g. 0.999; 0: the weights themselves)",
    )
    p.add_argument(
        "--mosaic", type=float, default=0.0,
        help="probability of a 4-image mosaic (with --cache-views: --cache-mosaic-views)",
    )  # fmt: skip
    p.add_argument("--no-augment", action="store_true", help="train on plainly resized images")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:i")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs")
    p.add_argument("--save-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--out", type=Path, default=Path("runs/yolov1.safetensors"))
    p.add_argument("--resume", action="store_true", help="continue from --out's .state.pt")
    p.add_argument("--init", type=Path, help="start from this checkpoint's matching tensors")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (for smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def setup_distributed(device_name: str) -> tuple[torch.device, int, int]:
    """Start the process group under torchrun (NCCL on CUDA, gloo on CPU)."""
    if not dist.is_torchelastic_launched():
        return resolve_device(device_name), 0, 1
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return device, rank, world


def check_view_options(args: argparse.Namespace) -> None:
    """The options that contradict each other: refused before any labelling starts."""
    if args.cache_views < 0 or args.cache_mosaic_views < 0:
        raise ValueError("--cache-views and --cache-mosaic-views count views: they must be >= 0")
    if args.cache_mosaic_views and not args.cache_views:
        raise ValueError("--cache-mosaic-views adds to --cache-views: give both")
    if args.backbone_side and not args.backbone:
        raise ValueError("--backbone-side runs beside a --backbone: give both")
    if args.distill_dense_boxes and not args.distill_dense:
        raise ValueError("--distill-dense-boxes needs --distill-dense")
    if args.distill_dense_side is not None:
        if not (args.distill_dense and args.backbone_side):
            raise ValueError("--distill-dense-side needs --distill-dense and --backbone-side")
        if not 0.0 <= args.distill_dense_side <= 1.0:
            raise ValueError(
                f"--distill-dense-side is a share in [0, 1], got {args.distill_dense_side}"
            )
    if args.cache_views and args.mosaic:
        raise ValueError(
            "--mosaic applies to live images; with --cache-views, use --cache-mosaic-views"
        )


class Trainer:
    """One training run; ``run()`` returns the path of the best checkpoint."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        check_view_options(args)
        self.device, self.rank, self.world = setup_distributed(args.device)
        self.main_process = self.rank == 0
        torch.manual_seed(args.seed + self.rank)
        random.seed(args.seed + self.rank)
        self.class_names = (
            load_class_names(args.class_names) if args.class_names else list(VOC_CLASSES)
        )
        C = len(self.class_names)
        train_ann = read_datasets(args.data, args.format, args.train_split, self.class_names)
        self.val_ann = read_datasets(
            args.val_data or args.data, args.format, args.val_split, self.class_names
        )
        if not train_ann:
            raise ValueError(f"no annotated images in split {args.train_split!r} of {args.data}")
        self.teacher_info: dict[str, Any] | None = None
        self.teacher = None
        if args.teacher:
            train_ann = self.add_teacher_labels(train_ann)
        elif args.unlabeled or args.soft_targets or args.teacher_fill:
            raise ValueError("--unlabeled, --teacher-fill and --soft-targets need a --teacher")
        self.paths = output_paths(args.out)
        self.model = self.build(C)
        initialised = init_from(self.model, args.init) if args.init else set()
        self.cell_layer = None
        if args.shared_cell_epochs < 0:
            raise ValueError(f"--shared-cell-epochs must be >= 0, got {args.shared_cell_epochs}")
        if args.shared_cell_epochs:
            self.cell_layer = cell_output_layer(self.model)
            # A layer --init gave keeps its cells' mean block (a layer trained shared keeps
            # itself); a new one gets a fresh block initialised for one cell's inputs.
            weight = self.cell_layer.weight
            name = next(n for n, p in self.model.named_parameters() if p is weight)
            share_cells(self.cell_layer, self.model.grid_size, fresh=name not in initialised)
        self.model.to(self.device)
        if not 0.0 <= args.ema < 1.0:
            raise ValueError(f"--ema must be in [0, 1), got {args.ema}")
        self.ema = None
        if args.ema:  # BatchNorm's running statistics are averaged too
            self.ema = AveragedModel(
                self.model, multi_avg_fn=ema_average(args.ema), use_buffers=True
            )
        S, B = self.model.grid_size, self.model.boxes_per_cell
        self.criterion = YOLOv1Loss(S, B, C)
        generator = torch.Generator().manual_seed(args.seed)
        self.cached_from = None
        # --distill-dense: one per stem backbone (None where no teacher has its layers)
        self.dense_teachers: list[DenseTeacher | None] = []
        self.dense_side = 0.5 if args.distill_dense_side is None else args.distill_dense_side
        if args.distill_dense < 0:
            raise ValueError(f"--distill-dense must be >= 0, got {args.distill_dense}")
        if args.distill_dense and not (args.cache_views and args.teacher):
            raise ValueError("--distill-dense needs --cache-views and a --teacher")
        if args.cache_views:
            dataset = self.cached_dataset(train_ann)
        else:
            dataset = DetectionDataset(
                train_ann, args.img_size, train=not args.no_augment, mosaic=args.mosaic
            )
        self.sampler = (
            DistributedSampler(dataset, seed=args.seed, drop_last=True)
            if self.world > 1
            else RandomSampler(dataset, generator=generator)
        )
        self.loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            sampler=self.sampler,
            num_workers=0 if self.cached_from is not None else args.workers,
            collate_fn=None if self.cached_from is not None else GridCollate(S, C),
            drop_last=len(dataset) > args.batch_size * self.world,
            pin_memory=self.device.type == "cuda",
            persistent_workers=args.workers > 0 and self.cached_from is None,
        )
        stem = [] if self.model.stem is None else list(self.model.stem.parameters())
        stem_ids = {id(p) for p in stem}
        head = [p for p in self.model.parameters() if id(p) not in stem_ids]
        params = [{"params": head}]
        if stem:
            params.append({"params": stem, "lr": args.lr * args.backbone_lr_scale})
        if args.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
            )
        else:
            self.optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        steps = len(self.loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, steps, args.epochs, args.warmup_epochs, args.schedule),
        )
        self.ddp = None
        if self.world > 1:
            device_ids = None
            if self.device.type == "cuda":  # SyncBatchNorm exists for CUDA only
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
                device_ids = [self.device]
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        self.amp_dtype = (
            (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
            if self.device.type == "cuda"
            else None
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.start_epoch, self.best_map, self.step = 0, -1.0, 0
        self.images_seen, self.train_seconds = 0, 0.0
        if args.resume:
            self.load_state()

    @property
    def served(self) -> YOLOv1:
        """The weights that are evaluated and saved: their moving average with --ema."""
        return self.model if self.ema is None else self.ema.module

    def build(self, C: int) -> YOLOv1:
        """The student: --backbone, --arch, the architecture of --init or of a run to resume."""
        a = self.args
        S_args = (C, a.boxes_per_cell, a.img_size)
        if a.backbone:
            if a.backbone_layer is None:
                raise ValueError("--backbone needs --backbone-layer")
            cfg, weights, layer, fine = *a.backbone, a.backbone_layer, a.backbone_fine_layer
            side = a.backbone_side
            arch = backbone_arch(
                cfg, layer, dropout=a.head_dropout, valid_head=a.valid_head_conv,
                kernel=a.head_kernel, fine_layer=fine, hidden=a.head_hidden, filters=a.head_filters,
                side=None if side is None else side[0],
            )  # fmt: skip
            model = YOLOv1(arch, *S_args, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
            load_backbone(model, cfg, weights, layer, fine, side)
            logger.info("backbone: %s layers 0..%d (fine: %s, side: %s)", cfg, layer, fine, side)
            return model
        if a.arch:
            return build_model(a.arch, *S_args)
        source = self.paths["last"] if a.resume else a.init
        if source is None:
            return build_model("yolov1", *S_args)
        sizes = {"num_classes": C, "boxes_per_cell": a.boxes_per_cell, "image_size": a.img_size}
        return model_from_metadata(read_metadata(source), source, **sizes)

    def add_teacher_labels(self, train_ann: list[Annotation]) -> list[Annotation]:
        """Label --unlabeled images (and, with --teacher-fill, missed objects) by the teacher."""
        a = self.args
        names = load_class_names(a.teacher_names) if a.teacher_names else None
        teacher = load_teachers(a.teacher, names)
        self.teacher = teacher
        mapping = class_mapping(teacher.class_names, self.class_names)
        if a.soft_targets and not teacher.gives_class_probs:
            raise ValueError("--soft-targets needs a Darknet teacher (CFG WEIGHTS): "
                             "a checkpoint teacher gives no class distribution")  # fmt: skip
        soft = a.soft_targets
        images = list_unlabeled(a.unlabeled, a.train_split) if a.unlabeled else []
        labelled = [ann.image_path for ann in train_ann] if a.teacher_fill else []
        cache = a.label_cache or a.out.parent / "teacher-labels"
        start = time.perf_counter()
        labels = label_images(teacher, images + labelled, cache, progress=not a.no_progress)
        seconds = time.perf_counter() - start
        extra = [
            teacher_annotation(p, labels[p], mapping, a.teacher_threshold, soft) for p in images
        ]
        foreign = {}
        if images and not a.keep_foreign_boxes:
            foreign = foreign_objects(a.unlabeled, a.train_split, self.class_names)
        before = sum(len(e.boxes) for e in extra)
        extra = [drop_foreign_boxes(e, foreign.get(e.image_path)) for e in extra]
        dropped = before - sum(len(e.boxes) for e in extra)
        if a.teacher_fill:
            train_ann = [
                fill_unlabelled_objects(
                    ann,
                    teacher_annotation(
                        ann.image_path, labels[ann.image_path], mapping, a.teacher_threshold, soft
                    ),
                )  # fmt: skip
                for ann in train_ann
            ]
        if soft:  # annotated boxes keep hard targets; the dataset wants one kind throughout
            train_ann = [ann.with_soft_targets(len(self.class_names)) for ann in train_ann]
        negatives = sum(len(e.boxes) == 0 for e in extra)
        logger.info(
            "teacher: %d unlabelled images (%d negatives, %d boxes; %d dropped on %d objects "
            "annotated as no student class) in %.1f s",
            len(extra), negatives, sum(len(e.boxes) for e in extra), dropped,
            sum(len(b) for b in foreign.values()), seconds,
        )  # fmt: skip
        self.teacher_info = {
            **teacher.describe(),
            "threshold": a.teacher_threshold,
            "fill": a.teacher_fill,
            "foreign_boxes_dropped": dropped,
            "soft_targets": soft,
            "unlabeled": [str(d) for d in a.unlabeled],
            "unlabeled_images": len(extra),
            "labelling_seconds": round(seconds, 1),
        }
        return train_ann + extra

    def cached_dataset(self, train_ann: list[Annotation]) -> TensorDataset:
        """--cache-views: the frozen stem prefix's features of every view, and their targets."""
        a = self.args
        if self.model.stem is None or a.train_from_layer is None:
            raise ValueError("--cache-views needs --backbone and --train-from-layer")
        if self.world > 1:
            raise ValueError("--cache-views trains on one process only")
        self.cached_from = a.train_from_layer - 1
        for net in self.model.stem.nets:
            for i, layer in enumerate(net.layers):
                for p in layer.parameters():
                    p.requires_grad_(i > self.cached_from)
        if a.distill_dense:  # refused here, before the features cost minutes
            self.dense_teachers = self.build_dense_teachers()
        start = time.perf_counter()
        kwargs = {"batch_size": 32, "workers": a.workers, "progress": not a.no_progress}
        cache = a.out.parent / "features"
        views = load_or_compute(
            cache, self.model, train_ann, self.cached_from, a.cache_views, a.seed, **kwargs
        )
        if a.cache_mosaic_views:
            mosaics = load_or_compute(
                cache, self.model, train_ann, self.cached_from, a.cache_mosaic_views, a.seed,
                mosaic=True, **kwargs,
            )  # fmt: skip
            views = Views(*(torch.cat(pair) for pair in zip(views, mosaics, strict=True)))
        logger.info("features ready in %.1f s", time.perf_counter() - start)
        if a.distill_dense_boxes:  # each batch also carries its cells' box classes
            return TensorDataset(*views)
        return TensorDataset(views.features, views.targets)

    def build_dense_teachers(self) -> list[DenseTeacher | None]:
        """--distill-dense: per backbone part of the cached features (the first, then the
        side's with --backbone-side), the output of the first Darknet teacher whose layers
        ``0..L`` that part's are, run on that part; None where no teacher has them (at least
        one must)."""
        members = getattr(self.teacher, "members", [self.teacher])
        darknets = [m for m in members if getattr(m, "network", None) is not None]
        if not darknets:
            raise ValueError("--distill-dense needs a Darknet --teacher (CFG WEIGHTS)")
        teachers = []
        for part in self.model.stem.nets:
            own = [t for t in darknets if same_prefix(part, t.network, self.cached_from)]
            teachers.append(self.dense_teacher(own[0]) if own else None)
        if all(t is None for t in teachers):
            raise ValueError(
                f"--distill-dense needs cached layers 0..{self.cached_from} that are a Darknet "
                f"teacher's own ({', '.join(t.cfg.name for t in darknets)}): a --backbone (or "
                "--backbone-side) from its cfg and weights, and no --init that changed those layers"
            )
        logger.info("dense distillation from %s", self.dense_names(teachers))
        return teachers

    @property
    def dense_mixed(self) -> bool:
        """Whether the dense term mixes two teachers (--distill-dense-side applies)."""
        return len(self.dense_teachers) == 2 and None not in self.dense_teachers

    @staticmethod
    def dense_names(teachers: list[DenseTeacher | None]) -> list[str | None]:
        return [None if t is None else t.name for t in teachers]

    def dense_teacher(self, darknet) -> DenseTeacher:
        mapping = class_mapping(darknet.class_names, self.class_names)
        network = darknet.network.to(self.device)
        S = self.model.grid_size
        return DenseTeacher(network, self.cached_from + 1, mapping, S, darknet.cfg.name)

    def set_backbone_frozen(self, frozen: bool) -> None:
        stem = self.model.stem
        if stem is None:
            return
        first = 0 if self.cached_from is None else self.cached_from + 1
        for layer in stem.layers_from(first):
            for p in layer.parameters():
                p.requires_grad_(not frozen)
        if frozen:
            stem.eval()  # BatchNorm statistics stay the pretrained ones

    # -- state ---------------------------------------------------------------------------------
    def metadata(self, epoch: int, val: dict[str, Any] | None) -> dict[str, Any]:
        a = self.args
        threshold = math.nan if val is None else val["conf_threshold_f1"]
        # The service's default confidence: the val split's best-F1 score threshold.
        calibrated = {} if math.isnan(threshold) else {"conf_threshold": round(threshold, 4)}
        return {
            "class_names": self.class_names,
            **calibrated,
            "training": {
                "command": "yolov1-train " + shlex.join(sys.argv[1:]),
                "data": [str(d) for d in a.data],
                "train_split": a.train_split,
                "val_split": a.val_split,
                "epochs_done": epoch + 1,
                "epochs": a.epochs,
                "optimizer": a.optimizer,
                "lr": a.lr,
                "batch_size": a.batch_size * self.world,
                "seed": a.seed,
                "ema": a.ema,
                "teacher": self.teacher_info,
                "cache_views": a.cache_views,
                "cache_mosaic_views": a.cache_mosaic_views,
                "shared_cell_epochs": a.shared_cell_epochs,
                "distill_dense": a.distill_dense,
                "distill_dense_teachers": self.dense_names(self.dense_teachers),
                "distill_dense_side": self.dense_side if self.dense_mixed else None,
                "distill_dense_boxes": a.distill_dense_boxes,
                "train_from_layer": a.train_from_layer,
                "images_per_second": round(self.images_seen / max(self.train_seconds, 1e-9), 2),
                "val_map50_11point": None if val is None else val["map50_11point"],
                "val_map50_all": None if val is None else val["map50_all"],
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        }

    def save(self, epoch: int, val: dict[str, Any] | None, best: bool) -> None:
        dtype = torch.float16 if self.args.save_dtype == "float16" else torch.float32
        meta = self.metadata(epoch, val)
        save_checkpoint(self.paths["last"], self.served, meta, dtype)
        if best:
            save_checkpoint(self.paths["best"], self.served, meta, dtype)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": torch.tensor(epoch),
            "step": torch.tensor(self.step),
            "best_map": torch.tensor(self.best_map),
            "torch_rng": torch.get_rng_state(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        tmp = self.paths["state"].with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.paths["state"])

    def load_state(self) -> None:
        path = self.paths["state"]
        if not path.is_file():
            raise ValueError(f"--resume: no training state at {path}")
        # weights_only: the restricted unpickler, which cannot run code from the file.
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.step = int(state["step"])
        self.best_map = float(state["best_map"])
        torch.set_rng_state(state["torch_rng"])
        if self.ema is not None and "ema" in state:  # else the average starts here
            self.ema.load_state_dict(state["ema"])
        logger.info("resumed from %s at epoch %d", path, self.start_epoch)

    # -- loop ----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        self.set_backbone_frozen(epoch < self.args.freeze_backbone_epochs)
        shared_cells = epoch < self.args.shared_cell_epochs
        if self.cell_layer is not None and epoch == self.args.shared_cell_epochs:
            for p in self.cell_layer.parameters():  # its moments were those of the tied layer
                self.optimizer.state.pop(p, None)
        net = self.ddp or self.model
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        sums: dict[str, float] = {}
        bar = tqdm(
            self.loader,
            desc=f"epoch {epoch + 1}/{self.args.epochs}",
            disable=not self.main_process or self.args.no_progress,
            leave=False,
        )
        start = time.perf_counter()
        batches = 0
        for images, targets, *cells in bar:  # cells: --distill-dense-boxes
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                if self.cached_from is None:
                    pred = net(images)
                else:  # images are the stem's cached features (float16 on disk)
                    features = images.float()
                    pred = self.model.forward_from(features, self.cached_from)
            terms = self.criterion.terms(pred.float(), targets)
            if self.dense_teachers:  # each on its backbone's part of the features, mixed
                parts = self.model.stem.split(features, self.cached_from)
                boxed = cells[0].to(self.device) if cells else None
                dense = [
                    None if teacher is None
                    else self.criterion.dense_term(
                        pred, targets, *boxed_targets(*teacher(part), boxed)
                    )
                    for teacher, part in zip(self.dense_teachers, parts, strict=True)
                ]  # fmt: skip
                terms["dense"] = self.args.distill_dense * mix_dense(dense, self.dense_side)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became non-finite ({loss.item()}) at epoch {epoch + 1}, step "
                    f"{self.step}; no weights were written for it. Lower --lr or --clip-grad."
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if shared_cells:
                share_cells(self.cell_layer, self.model.grid_size)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.step += 1
            batches += 1
            self.images_seen += images.shape[0] * self.world
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            bar.set_postfix({k: f"{v.item():.2f}" for k, v in terms.items()})
            if self.args.max_steps and self.step >= self.args.max_steps:
                break
        self.train_seconds += time.perf_counter() - start
        if self.ddp is not None:
            # DDP syncs BatchNorm's running statistics at each forward, so after the last step
            # each rank holds its own; rank 0's become everyone's, as they are the ones saved.
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)
        return {k: v / max(batches, 1) for k, v in sums.items()}

    def run(self) -> Path:
        args = self.args
        fields = ["epoch", "lr", "coord", "object", "noobj", "class", "val_map50", "seconds"]
        fields += ["dense"] if self.dense_teachers else []
        log_path, class_path = self.paths["csv"], self.paths["class_csv"]
        # One object of a class with one val object moves the mean by up to 1/C: the class
        # log says which class a step in the curve comes from.
        class_fields = ["epoch", *self.class_names]
        if self.main_process:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            for path, header in ((log_path, fields), (class_path, class_fields)):
                if not (args.resume and path.exists()):
                    with open(path, "w", newline="") as f:
                        csv.writer(f).writerow(header)
        epoch = self.start_epoch - 1
        try:
            for epoch in range(self.start_epoch, args.epochs):
                started = time.perf_counter()
                losses = self.train_epoch(epoch)
                val = None
                last_epoch = epoch + 1 == args.epochs
                stop = bool(args.max_steps and self.step >= args.max_steps)
                if (
                    self.main_process
                    and self.val_ann
                    and ((epoch + 1) % args.eval_every == 0 or last_epoch or stop)
                ):
                    preds = predict(self.served, self.val_ann, self.device, args.batch_size)
                    val = score(preds, self.val_ann, len(self.class_names))
                if self.main_process:
                    current = -1.0 if val is None else val["map50_11point"]
                    is_best = val is not None and (current > self.best_map or self.best_map < 0)
                    self.best_map = max(self.best_map, current)
                    self.save(epoch, val, best=is_best or not self.paths["best"].exists())
                    row = [epoch + 1, self.optimizer.param_groups[0]["lr"]]
                    row += [round(losses.get(k, float("nan")), 4) for k in fields[2:6]]
                    row += [None if val is None else round(current, 4)]
                    row += [round(time.perf_counter() - started, 1)]
                    row += [round(losses["dense"], 4)] if "dense" in fields else []
                    with open(log_path, "a", newline="") as f:
                        csv.writer(f).writerow(row)
                    if val is not None:  # AP50 11-point; empty where val has no such object
                        aps = [None if ap != ap else round(ap, 4) for ap in val["ap50_11point"]]
                        with open(class_path, "a", newline="") as f:
                            csv.writer(f).writerow([epoch + 1, *aps])
                    logger.info(
                        "epoch %d/%d loss %.3f val mAP@0.5 %s (best %.4f)",
                        epoch + 1, args.epochs, sum(losses.values()),
                        "-" if val is None else f"{current:.4f}", self.best_map,
                    )  # fmt: skip
                if stop:
                    break
        except KeyboardInterrupt:
            if self.main_process:
                self.save(max(epoch, 0), None, best=not self.paths["best"].exists())
                logger.warning(
                    "interrupted: saved %s and %s", self.paths["last"], self.paths["state"]
                )
            raise
        if self.main_process and self.train_seconds > 0:
            rate = self.images_seen / self.train_seconds
            print(f"trained on {self.images_seen} images at {rate:.1f} images/s; "
                  f"best val mAP@0.5 {self.best_map:.4f} -> {self.paths['best']}")  # fmt: skip
        return self.paths["best"]


def main(args: argparse.Namespace) -> Path:
    trainer = Trainer(args)
    try:
        return trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(argv: list[str] | None = None) -> None:
    """Console entry point: errors are one line on stderr, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (
        TrainingError,
        CheckpointError,
        DarknetError,
        ValueError,
        FileNotFoundError,
        OSError,
    ) as exc:
        print(f"yolov1-train: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
