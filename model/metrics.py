"""Detection metrics: Pascal VOC average precision and COCO-style mAP@[.5:.95].

Both entry points take the torchvision detection contract, aligned per image:

- a prediction is ``{"boxes": (K, 4) xyxy, "scores": (K,), "labels": (K,) int}``;
- a ground truth is ``{"boxes": (G, 4) xyxy, "labels": (G,) int, "difficult": (G,) bool}``,
  ``difficult`` being optional (all ``False`` when absent).

Boxes may be in any unit (pixels or normalised) as long as predictions and ground truths agree.
IoU is torchvision's continuous ``box_iou``, not the VOC devkit's ``+1`` pixel convention.

Both metrics reduce each image to per-class detection flags (true positive / ignored, one row per
IoU threshold) and then integrate one precision-recall curve per class over all images; they
differ only in how a detection is matched to a ground truth (see ``evaluate_detections`` and
``coco_map``) and how the curve is integrated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypedDict

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["CocoMetrics", "DetectionMetrics", "coco_map", "evaluate_detections"]

INTERPOLATIONS: tuple[str, ...] = ("11point", "all", "coco101")

# VOC2007 samples recall at t = 0, 0.1, ..., 1: the reference voc_eval's own array, bit for bit
# (np.arange(0.0, 1.1, 0.1), also in py-faster-rcnn and Detectron2), so published VOC numbers are
# reproduced exactly. Its 0.3, 0.6 and 0.7 are 0.30000000000000004, 0.6000000000000001 and
# 0.7000000000000001: a recall of exactly 3/10, 6/10 or 7/10 does not reach them.
_VOC07_RECALL_THRESHOLDS = torch.from_numpy(np.arange(0.0, 1.1, 0.1))
# pycocotools' own arrays, bit for bit, so that coco_map agrees with COCOeval even where a recall
# lands exactly on a threshold (np.linspace(0, 1, 101)[3] is 0.030000000000000002, not 0.03).
_COCO_RECALL_THRESHOLDS = torch.from_numpy(np.linspace(0.0, 1.0, 101))
_COCO_IOU_THRESHOLDS = torch.from_numpy(np.linspace(0.5, 0.95, 10))
_COCO_MAX_DETECTIONS = 100  # COCOeval's maxDets[-1], applied per image and class

# matcher(iou (D, G) with rows sorted by score descending, gt_ignored (G,) bool)
#   -> (true_positive (T, D) bool, ignored (T, D) bool), one row per IoU threshold
Matcher = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class DetectionMetrics(TypedDict):
    """Result of ``evaluate_detections``: the mean of the non-NaN per-class APs, and those APs."""

    map: float
    ap: list[float]


class CocoMetrics(TypedDict):
    """Result of ``coco_map``: AP averaged over IoU 0.50:0.05:0.95, at 0.50 and at 0.75."""

    map: float
    map50: float
    map75: float


def evaluate_detections(
    predictions: Sequence[Mapping[str, Tensor]],
    ground_truths: Sequence[Mapping[str, Tensor]],
    num_classes: int,
    iou_threshold: float = 0.5,
    interpolation: str = "11point",
) -> DetectionMetrics:
    """Pascal VOC mean average precision over ``num_classes`` classes.

    Args:
        predictions: one dict per image with ``boxes`` (K, 4) xyxy, ``scores`` (K,) and
            ``labels`` (K,) int in ``[0, num_classes)``.
        ground_truths: one dict per image, aligned with ``predictions``, with ``boxes`` (G, 4)
            xyxy in the same unit, ``labels`` (G,) int and optional ``difficult`` (G,) bool.
        num_classes: number of classes C; ``ap`` has C entries.
        iou_threshold: a detection is a hit when its IoU with a ground truth is ``>=`` this.
        interpolation: how each precision-recall curve becomes one number:
            ``"11point"`` (VOC2007: mean over t in {0, 0.1, ..., 1}, the devkit's doubles, of
            the highest precision at recall >= t), ``"all"`` (VOC2010+: area under the
            monotone precision envelope) or
            ``"coco101"`` (the same as 11point with COCO's 101 recall points 0:0.01:1).

    Matching follows the VOC devkit. Per class, detections from all images are sorted by score
    (descending, stable). Each is compared with every ground truth of its class in its image,
    difficult ones included, and takes the one with the highest IoU. If that IoU is below the
    threshold the detection is a false positive; if that ground truth is difficult the detection is
    ignored (neither TP nor FP); if it is still free the detection is a true positive and takes it;
    if it is already taken the detection is a false positive, even when another free ground truth
    also overlaps enough (``coco_map`` would match that one instead).

    Returns:
        ``{"map": float, "ap": list[float]}``. ``ap[c]`` is NaN when class c has no non-difficult
        ground truth; such classes are left out of ``map``, which is NaN when every class is.
        A class with ground truth but no detection has AP 0.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    recall_thresholds = {
        "11point": _VOC07_RECALL_THRESHOLDS,
        "all": None,
        "coco101": _COCO_RECALL_THRESHOLDS,
    }[interpolation]

    matcher = partial(_match_voc, iou_threshold=iou_threshold)
    per_class = _match_dataset(
        predictions, ground_truths, num_classes, matcher, num_thresholds=1, max_detections=None
    )
    ap = [float(_class_ap(matches, recall_thresholds)[0]) for matches in per_class]
    return {"map": _nanmean(ap), "ap": ap}


def coco_map(
    predictions: Sequence[Mapping[str, Tensor]],
    ground_truths: Sequence[Mapping[str, Tensor]],
    num_classes: int,
) -> CocoMetrics:
    """COCO box mAP: the 101-point AP averaged over IoU thresholds 0.50:0.05:0.95.

    Inputs are as for ``evaluate_detections``. This reproduces pycocotools' ``COCOeval`` with
    ``iouType="bbox"``, area range ``all`` and ``maxDets=100``: ``map``, ``map50`` and ``map75``
    are its ``stats[0]``, ``stats[1]`` and ``stats[2]``.

    Matching follows COCO, which differs from VOC's: per image and class, detections in score order
    (only the top 100 count) take the *unmatched* ground truth with the highest IoU above the
    threshold, so a duplicate can still claim a second, less-overlapping ground truth where VOC
    calls it a false positive. Non-difficult ground truths are preferred; only when none is free
    and overlapping enough may a detection match a difficult one, which makes it ignored and uses
    that ground truth up (COCOeval's handling of a non-crowd ignored ground truth). There are no
    crowd boxes and no area ranges.

    Returns:
        ``{"map": float, "map50": float, "map75": float}``, each the mean over classes that have a
        non-difficult ground truth (NaN when no class has one).
    """
    per_class = _match_dataset(
        predictions,
        ground_truths,
        num_classes,
        _match_coco,
        num_thresholds=len(_COCO_IOU_THRESHOLDS),
        max_detections=_COCO_MAX_DETECTIONS,
    )
    ap = [_class_ap(matches, _COCO_RECALL_THRESHOLDS) for matches in per_class]  # (T,) each
    ap = torch.stack(ap)  # (C, T)
    return {
        "map": _nanmean(ap.mean(dim=1).tolist()),
        "map50": _nanmean(ap[:, 0].tolist()),  # thresholds are 0.50 + 0.05 k
        "map75": _nanmean(ap[:, 5].tolist()),
    }


def best_f1_threshold(
    predictions: Sequence[Mapping[str, Tensor]],
    ground_truths: Sequence[Mapping[str, Tensor]],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> float:
    """The score threshold that maximises F1 over all classes pooled (VOC matching).

    Detections are matched as in ``evaluate_detections`` (matches of difficult objects are
    left out), then ranked by score across classes; the threshold is the score of the last
    detection kept at the best F1. Returns NaN when there is no detection or no ground truth.
    """
    per_class = _match_dataset(
        predictions, ground_truths, num_classes,
        lambda iou, difficult: _match_voc(iou, difficult, iou_threshold), 1, None,
    )  # fmt: skip
    scores = [s for m in per_class for s in m.scores]
    if not scores or not sum(m.num_positives for m in per_class):
        return math.nan
    score = torch.cat(scores)
    hit = torch.cat([t[0] for m in per_class for t in m.true_positive])
    kept = ~torch.cat([i[0] for m in per_class for i in m.ignored])
    score, hit = score[kept], hit[kept]
    if score.numel() == 0:
        return math.nan
    order = torch.argsort(score, descending=True, stable=True)
    true_pos = torch.cumsum(hit[order].double(), 0)
    ranks = torch.arange(1, len(order) + 1, dtype=torch.float64)
    positives = sum(m.num_positives for m in per_class)
    f1 = 2 * true_pos / (ranks + positives)  # 2PR / (P + R) with P = tp/k, R = tp/positives
    return float(score[order][int(f1.argmax())])


@dataclass
class _ClassMatches:
    """One class's detections over the whole data set, per image, rows sorted by score."""

    num_thresholds: int
    scores: list[Tensor] = field(default_factory=list)  # (D_i,) float64
    true_positive: list[Tensor] = field(default_factory=list)  # (T, D_i) bool
    ignored: list[Tensor] = field(default_factory=list)  # (T, D_i) bool
    num_positives: int = 0  # non-difficult ground truths: the recall denominator


def _match_dataset(
    predictions: Sequence[Mapping[str, Tensor]],
    ground_truths: Sequence[Mapping[str, Tensor]],
    num_classes: int,
    matcher: Matcher,
    num_thresholds: int,
    max_detections: int | None,
) -> list[_ClassMatches]:
    """Match every image's detections class by class; return the flags gathered per class.

    ``matcher`` returns ``num_thresholds`` rows of flags; only each image's ``max_detections``
    highest-scoring detections of a class are matched (all of them when ``None``).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions and ground_truths must be aligned per image, got "
            f"{len(predictions)} and {len(ground_truths)} images"
        )
    per_class = [_ClassMatches(num_thresholds) for _ in range(num_classes)]

    for image, (prediction, truth) in enumerate(zip(predictions, ground_truths, strict=True)):
        pred_boxes, pred_scores, pred_labels = _read_prediction(prediction, image, num_classes)
        gt_boxes, gt_labels, gt_difficult = _read_ground_truth(truth, image, num_classes)
        for cls in torch.unique(torch.cat([pred_labels, gt_labels])).tolist():
            is_pred, is_gt = pred_labels == cls, gt_labels == cls
            scores = pred_scores[is_pred]
            order = torch.argsort(scores, descending=True, stable=True)[:max_detections]
            iou = box_iou(pred_boxes[is_pred][order], gt_boxes[is_gt])  # (D, G)
            true_positive, ignored = matcher(iou, gt_difficult[is_gt])  # (T, D) each

            matches = per_class[cls]
            matches.scores.append(scores[order])
            matches.true_positive.append(true_positive)
            matches.ignored.append(ignored)
            matches.num_positives += int((~gt_difficult[is_gt]).sum())
    return per_class


def _match_voc(iou: Tensor, gt_difficult: Tensor, iou_threshold: float) -> tuple[Tensor, Tensor]:
    """VOC devkit matching of one image's detections of one class; see ``evaluate_detections``.

    Args:
        iou: (D, G) float, rows sorted by detection score descending.
        gt_difficult: (G,) bool.
        iou_threshold: minimum IoU of a hit.

    Returns:
        ``(true_positive, ignored)``, each (1, D) bool.
    """
    num_dets, num_gts = iou.shape
    true_positive = [False] * num_dets
    ignored = [False] * num_dets
    if num_gts > 0:
        best_gt = iou.argmax(dim=1)  # (D,); ties go to the first ground truth, as np.argmax
        best_iou = iou.gather(1, best_gt[:, None])[:, 0]  # (D,)
        difficult = gt_difficult.tolist()
        taken = [False] * num_gts
        for det, (overlap, gt) in enumerate(zip(best_iou.tolist(), best_gt.tolist(), strict=True)):
            if overlap < iou_threshold:
                continue
            if difficult[gt]:
                ignored[det] = True
            elif not taken[gt]:
                true_positive[det] = taken[gt] = True
    # dtype spelled out: an image with no detection gives empty lists, which torch reads as float
    return (
        torch.tensor([true_positive], dtype=torch.bool),  # (1, D)
        torch.tensor([ignored], dtype=torch.bool),  # (1, D)
    )


def _match_coco(iou: Tensor, gt_ignored: Tensor) -> tuple[Tensor, Tensor]:
    """COCOeval matching of one image's detections of one class at every COCO IoU threshold.

    Args:
        iou: (D, G) float, rows sorted by detection score descending.
        gt_ignored: (G,) bool, the difficult ground truths.

    Returns:
        ``(true_positive, ignored)``, each (T, D) bool with T = 10 thresholds 0.50:0.05:0.95.
    """
    num_dets, num_gts = iou.shape
    thresholds = _COCO_IOU_THRESHOLDS.to(iou.dtype)[:, None]  # (T, 1)
    true_positive = torch.zeros((len(thresholds), num_dets), dtype=torch.bool)
    ignored = torch.zeros_like(true_positive)
    if num_gts == 0:
        return true_positive, ignored
    taken = torch.zeros((len(thresholds), num_gts), dtype=torch.bool)  # (T, G)
    rows = torch.arange(len(thresholds))
    # Lifting regular ground truths above every ignored one makes a single argmax prefer them,
    # as COCOeval does by sorting ignored ground truths last and stopping at the first of them.
    preference = iou + 2.0 * (~gt_ignored)  # (D, G)
    for det in range(num_dets):
        free = (iou[det] >= thresholds) & ~taken  # (T, G)
        key = torch.where(free, preference[det], -1.0)  # (T, G)
        # COCOeval keeps the *last* ground truth among equal IoUs: argmax of the reversed row.
        best = num_gts - 1 - key.flip(1).argmax(dim=1)  # (T,)
        found = free.any(dim=1)  # (T,)
        best_ignored = gt_ignored[best]  # (T,)
        true_positive[:, det] = found & ~best_ignored
        ignored[:, det] = found & best_ignored
        taken[rows[found], best[found]] = True
    return true_positive, ignored


def _class_ap(matches: _ClassMatches, recall_thresholds: Tensor | None) -> Tensor:
    """AP of one class at each of its T IoU thresholds: (T,) float64, NaN without positives."""
    if matches.num_positives == 0:
        return torch.full((matches.num_thresholds,), math.nan, dtype=torch.float64)
    scores = torch.cat(matches.scores)  # (D,)
    order = torch.argsort(scores, descending=True, stable=True)
    true_positive = torch.cat(matches.true_positive, dim=1)[:, order]  # (T, D)
    ignored = torch.cat(matches.ignored, dim=1)[:, order]  # (T, D)
    ap = [
        _average_precision(tp[~ign], matches.num_positives, recall_thresholds)
        for tp, ign in zip(true_positive, ignored, strict=True)
    ]
    return torch.tensor(ap, dtype=torch.float64)


def _average_precision(
    true_positive: Tensor, num_positives: int, recall_thresholds: Tensor | None
) -> float:
    """Integrate one precision-recall curve.

    Args:
        true_positive: (D,) bool, the counted detections (ignored ones removed) by score
            descending; ``False`` is a false positive.
        num_positives: non-difficult ground truths, > 0.
        recall_thresholds: (R,) float64 to average the interpolated precision at those recalls,
            or ``None`` for the area under the precision envelope (VOC2010+).
    """
    if true_positive.numel() == 0:
        return 0.0
    tp = torch.cumsum(true_positive.to(torch.float64), dim=0)  # (D,)
    fp = torch.cumsum((~true_positive).to(torch.float64), dim=0)  # (D,)
    recall = tp / num_positives
    precision = tp / (tp + fp)  # every denominator >= 1

    if recall_thresholds is None:
        recall = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])  # (D+2,)
        precision = torch.cat([precision.new_zeros(1), precision, precision.new_zeros(1)])
        envelope = _precision_envelope(precision)
        step = torch.nonzero(recall[1:] != recall[:-1])[:, 0]
        return float(((recall[step + 1] - recall[step]) * envelope[step + 1]).sum())

    # Highest precision at recall >= t is the envelope at the first point reaching t.
    envelope = _precision_envelope(precision)
    first = torch.searchsorted(recall, recall_thresholds, side="left")  # (R,)
    reached = first < len(recall)
    sampled = torch.where(reached, envelope[first.clamp(max=len(recall) - 1)], 0.0)  # (R,)
    return float(sampled.mean())


def _precision_envelope(precision: Tensor) -> Tensor:
    """(N,) -> (N,): at each point the highest precision at that point or any later one."""
    return torch.flip(torch.cummax(torch.flip(precision, [0]), dim=0).values, [0])


def _read_prediction(
    prediction: Mapping[str, Tensor], image: int, num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate one prediction; return boxes (K, 4) xyxy, scores (K,) float64, labels (K,) int64."""
    boxes = _read_boxes(prediction, "predictions", image)
    scores = torch.as_tensor(prediction["scores"]).detach().to("cpu", torch.float64).reshape(-1)
    labels = _read_labels(prediction, "predictions", image, num_classes)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"predictions[{image}] has {len(boxes)} boxes, {len(scores)} scores and "
            f"{len(labels)} labels; they must match"
        )
    return boxes, scores, labels


def _read_ground_truth(
    truth: Mapping[str, Tensor], image: int, num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate one ground truth; return boxes (G, 4) xyxy, labels (G,) int64, difficult (G,)."""
    boxes = _read_boxes(truth, "ground_truths", image)
    labels = _read_labels(truth, "ground_truths", image, num_classes)
    difficult = truth.get("difficult")
    if difficult is None:
        difficult = torch.zeros(len(boxes), dtype=torch.bool)
    difficult = torch.as_tensor(difficult).detach().to("cpu", torch.bool).reshape(-1)
    if not len(boxes) == len(labels) == len(difficult):
        raise ValueError(
            f"ground_truths[{image}] has {len(boxes)} boxes, {len(labels)} labels and "
            f"{len(difficult)} difficult flags; they must match"
        )
    return boxes, labels, difficult


def _read_boxes(target: Mapping[str, Tensor], name: str, image: int) -> Tensor:
    """(K, 4) float64 on the CPU; an empty tensor of any shape reads as (0, 4)."""
    boxes = torch.as_tensor(target["boxes"]).detach().to("cpu", torch.float64)
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}[{image}]['boxes'] must be (K, 4) xyxy, got {tuple(boxes.shape)}")
    return boxes


def _read_labels(target: Mapping[str, Tensor], name: str, image: int, num_classes: int) -> Tensor:
    """(K,) int64 on the CPU, each in [0, num_classes)."""
    labels = torch.as_tensor(target["labels"]).detach().to("cpu").reshape(-1)
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name}[{image}]['labels'] must be integers, got {labels.dtype}")
    labels = labels.to(torch.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad) > 0:
        raise ValueError(
            f"{name}[{image}]['labels'] must be in [0, {num_classes}), got {bad[0].item()}"
        )
    return labels


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    kept = [value for value in values if not math.isnan(value)]
    return sum(kept) / len(kept) if kept else math.nan
