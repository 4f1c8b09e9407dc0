"""Train on cached backbone features: a frozen Darknet stem prefix runs once per image view.

On two CPU cores a pretrained backbone's forward and backward cost far more than the YOLOv1
head, so with ``--cache-views V`` the stem's layers ``0..L`` (``--train-from-layer L + 1``) run
once, in eval mode, on V views of every training image: the plain resize, its mirror image,
and V - 2 views through the training augmentation (scale, translation, colour, flip); with
``--cache-mosaic-views M``, M more views an image, each a 2x2 mosaic of it and three random
images through the same augmentation (a second cache file: the first V views are reused).
Each view's boxes move with its pixels, through the same torchvision pipeline as annotated
boxes, and are encoded as the view's target grid and its map of the box class each cell lies
in. Training then runs the remaining stem layers and the head on these features. The cache is
a safetensors file keyed by everything that changes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from model.data import (
    Annotation,
    DetectionDataset,
    Sample,
    detection_collate,
    label_cells,
    target_grid,
)
from model.network import YOLOv1, fold_batchnorm

logger = logging.getLogger(__name__)


class Views(NamedTuple):
    """The cached views of a training set: ``features`` (V*N, c, h, w) float16 of the stem's
    layer, ``targets`` (V*N, S, S, C + 5) and ``cells`` (V*N, S, S), each cell's box class
    (``model.data.label_cells``, -1 outside every box)."""

    features: torch.Tensor
    targets: torch.Tensor
    cells: torch.Tensor


def view_datasets(
    annotations: Sequence[Annotation], image_size: int, views: int, mosaic: bool = False
) -> list[Dataset[Sample]]:
    """One dataset per view: plain, mirrored, then ``views - 2`` augmented ones; with ``mosaic``,
    ``views`` augmented mosaics instead."""
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    if mosaic:
        return [DetectionDataset(annotations, image_size, train=True, mosaic=1.0)] * views
    mirrored = v2.Compose(
        [
            v2.Resize((image_size, image_size), antialias=True),
            v2.RandomHorizontalFlip(p=1.0),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    datasets: list[Dataset[Sample]] = [DetectionDataset(annotations, image_size, train=False)]
    if views > 1:
        datasets.append(DetectionDataset(annotations, image_size, False, transform=mirrored))
    datasets += [DetectionDataset(annotations, image_size, train=True)] * (views - 2)
    return datasets


def cache_key(
    model: YOLOv1, annotations: Sequence[Annotation], layer: int, views: int, seed: int, **kwargs
) -> str:
    """A digest of what the features depend on: the stem's weights, the images, the layer,
    views, seed, loader settings and ``mosaic`` (``compute_features``' keywords). Not the
    boxes: the augmentation draws its parameters without looking at them, so other labels of
    the same images reuse the features."""
    digest = hashlib.sha256()
    state = model.stem.net.state_dict()
    if model.stem.side is not None:  # a one-backbone stem keeps the key it had
        state |= {f"side.{k}": v for k, v in model.stem.side.state_dict().items()}
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    for ann in annotations:
        digest.update(str(ann.image_path).encode())
    settings = [layer, views, seed, model.image_size, kwargs.get("batch_size", 32),
                kwargs.get("workers", 2)]  # fmt: skip
    if kwargs.get("mosaic"):  # plain views keep the key they had before mosaics existed
        settings.append("mosaic")
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()


@torch.inference_mode()
def compute_features(
    model: YOLOv1,
    annotations: Sequence[Annotation],
    layer: int,
    views: int,
    seed: int,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
    targets_only: bool = False,
    mosaic: bool = False,
) -> Views:
    """The features of stem layer ``layer`` on every view, and the views' targets and cells.

    ``targets_only``: the same views' targets and no features (an empty tensor): the views are
    drawn exactly as with features, for labels that changed on cached images. ``mosaic``: the
    views are ``view_datasets``' mosaics.
    """
    model.stem.check_split(layer + 1)
    frozen = fold_batchnorm(model).eval()
    S, C = model.grid_size, model.num_classes
    dataset = ConcatDataset(view_datasets(annotations, model.image_size, views, mosaic))
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size, num_workers=workers, collate_fn=detection_collate,
        generator=generator, worker_init_fn=_seed_worker,
    )  # fmt: skip
    features, targets, cells = [], [], []
    with torch.random.fork_rng():  # workers=0 draws from this process's generator: seed it
        torch.manual_seed(seed)
        for feats, batch in _views(loader, frozen, layer, targets_only, progress):
            features += feats
            targets += [target_grid(t, S, C) for t in batch]  # as in training
            cells += [label_cells(t, S) for t in batch]
    features = torch.cat(features) if features else torch.empty(0)
    return Views(features, torch.stack(targets), torch.stack(cells))


def _views(loader, frozen: YOLOv1, layer: int, targets_only: bool, progress: bool):
    for images, batch in tqdm(loader, desc="features", disable=not progress, leave=False):
        yield ([] if targets_only else [frozen.stem_features(images, layer).half()]), batch


def _seed_worker(worker_id: int) -> None:
    torch.manual_seed(torch.initial_seed() % 2**31 + worker_id)


def load_or_compute(
    path_dir: Path,
    model: YOLOv1,
    annotations: Sequence[Annotation],
    layer: int,
    views: int,
    seed: int,
    **kwargs,
) -> Views:
    """``compute_features``, cached in ``path_dir/features-<key16>.safetensors``."""
    key = cache_key(model, annotations, layer, views, seed, **kwargs)
    path = Path(path_dir) / f"features-{key[:16]}.safetensors"
    if path.is_file():
        features = load_file(str(path))["features"]
        logger.info("features: reusing %s; drawing the views' targets", path)
        replayed = compute_features(
            model, annotations, layer, views, seed, targets_only=True, **kwargs
        )
        if len(replayed.targets) != len(features):
            raise RuntimeError(
                f"{path}: {len(features)} features for {len(replayed.targets)} targets"
            )
        return replayed._replace(features=features)
    drawn = compute_features(model, annotations, layer, views, seed, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"features": drawn.features}, str(tmp))
    tmp.replace(path)
    logger.info("features: %d views of layer %d cached in %s", len(drawn.targets), layer, path)
    return drawn
