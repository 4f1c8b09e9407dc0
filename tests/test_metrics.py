"""Tests for model.metrics: hand-worked VOC values, edge cases, a literal numpy port of the VOC
devkit's evaluation, and pycocotools' COCOeval as references."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from model import metrics
from model.metrics import coco_map, evaluate_detections

INTERPOLATIONS = ("11point", "all", "coco101")


def _prediction(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float64),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _truth(
    boxes: list[list[float]], labels: list[int], difficult: list[bool] | None = None
) -> dict:
    truth = {
        "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if difficult is not None:
        truth["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return truth


# --------------------------------------------------------------------------- hand-worked example
#
# One class, two images, xyxy boxes. Ground truth (3 regular + 1 difficult):
#   image A: a1 = [0, 0, 10, 10], a2 = [20, 20, 30, 30]
#   image B: b1 = [0, 0, 10, 10], b2 = [50, 50, 60, 60] (difficult)
# Detections, by score:
#   d1 0.9 A [0, 0, 10, 10]   IoU(a1) = 1                      -> TP, takes a1
#   d2 0.8 A [1, 0, 11, 10]   IoU(a1) = 90 / 110 = 0.82, taken -> FP (duplicate)
#   d3 0.7 B [50, 50, 60, 60] IoU(b2) = 1, difficult           -> ignored
#   d4 0.6 B [30, 30, 40, 40] overlaps nothing                 -> FP
#   d5 0.5 A [20, 20, 30, 30] IoU(a2) = 1                      -> TP
#   d6 0.4 B [0, 0, 10, 10]   IoU(b1) = 1                      -> TP
# Counted detections TP FP FP TP TP with 3 positives:
#   recall    1/3  1/3  1/3  2/3  1
#   precision 1    1/2  1/3  1/2  3/5
#   precision envelope (max at this recall or later): 1, 3/5, 3/5, 3/5, 3/5
# "all":     recall steps 0->1/3 at 1, 1/3->2/3 at 3/5, 2/3->1 at 3/5
#            AP = 1/3 + 1/5 + 1/5 = 11/15
# "11point": t = 0, .1, .2, .3 (4 points) reach 1; t = .4 ... 1 (7 points) reach 3/5
#            AP = (4 + 7 * 3/5) / 11 = 41/55
# "coco101": t = 0, .01, ..., .33 (34 points) reach 1; t = .34 ... 1 (67 points) reach 3/5
#            AP = (34 + 67 * 3/5) / 101 = 371/505
# Every IoU is 0 or 1 except d2's, whose only overlap is taken, so COCO matching agrees with VOC at
# every IoU threshold and coco_map gives 371/505 for map, map50 and map75.
HAND_AP = {"11point": 41 / 55, "all": 11 / 15, "coco101": 371 / 505}


@pytest.fixture
def hand_example() -> tuple[list[dict], list[dict]]:
    predictions = [
        _prediction([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], [0.9, 0.8, 0.5], [0, 0, 0]),
        _prediction(
            [[50, 50, 60, 60], [30, 30, 40, 40], [0, 0, 10, 10]], [0.7, 0.6, 0.4], [0, 0, 0]
        ),
    ]
    ground_truths = [
        _truth([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], [False, False]),
        _truth([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0], [False, True]),
    ]
    return predictions, ground_truths


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_hand_worked_example(hand_example, interpolation: str) -> None:
    result = evaluate_detections(*hand_example, num_classes=1, interpolation=interpolation)
    assert type(result["map"]) is float and type(result["ap"][0]) is float
    assert result["ap"] == [pytest.approx(HAND_AP[interpolation], abs=1e-12)]
    assert result["map"] == pytest.approx(HAND_AP[interpolation], abs=1e-12)


def test_hand_worked_example_coco(hand_example) -> None:
    result = coco_map(*hand_example, num_classes=1)
    assert all(type(value) is float for value in result.values())
    expected = pytest.approx(371 / 505, abs=1e-12)
    assert result == {"map": expected, "map50": expected, "map75": expected}


def test_hand_worked_example_detections_order_does_not_matter(hand_example) -> None:
    predictions, ground_truths = hand_example
    shuffled = [{key: value.flip(0) for key, value in p.items()} for p in predictions]
    result = evaluate_detections(shuffled, ground_truths, num_classes=1, interpolation="all")
    assert result["map"] == pytest.approx(11 / 15, abs=1e-12)


# ------------------------------------------------------------------ VOC versus COCO matching
#
# One image, ground truths g1 = [0, 0, 10, 10] and g2 = [2, 0, 12, 10].
#   e1 0.9 [0.5, 0, 10.5, 10]: IoU(g1) = 95/105 = 0.905, IoU(g2) = 85/115 = 0.739
#   e2 0.8 [0, 0, 10, 10]:     IoU(g1) = 1,              IoU(g2) = 80/120 = 0.667
# VOC at 0.5: e1 takes g1; e2's best is g1, already taken -> FP. TP FP of 2 positives:
#   "all" AP = 1/2 * 1 = 1/2; "coco101" AP = 51 points (recall 0 ... .5) at 1 = 51/101.
# COCO: e1 takes g1 up to threshold .90 (.905 >= .9); e2 takes the free g2 up to .65 (.667).
#   t in .50 .. .65 (4 thresholds): TP TP                    -> AP 1
#   t in .70 .. .90 (5 thresholds): TP FP                    -> AP 51/101
#   t = .95: e1 unmatched -> FP, e2 takes g1 (IoU 1) -> FP TP -> AP 51 points at 1/2 = 25.5/101
#   map = (4 + 5 * 51/101 + 25.5/101) / 10 = 684.5/1010, map50 = 1, map75 = 51/101
@pytest.fixture
def duplicate_example() -> tuple[list[dict], list[dict]]:
    predictions = [_prediction([[0.5, 0, 10.5, 10], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    ground_truths = [_truth([[0, 0, 10, 10], [2, 0, 12, 10]], [0, 0])]
    return predictions, ground_truths


def test_voc_matching_counts_duplicate_of_taken_best_match_as_fp(duplicate_example) -> None:
    all_points = evaluate_detections(*duplicate_example, num_classes=1, interpolation="all")
    coco101 = evaluate_detections(*duplicate_example, num_classes=1, interpolation="coco101")
    assert all_points["map"] == pytest.approx(1 / 2, abs=1e-12)
    assert coco101["map"] == pytest.approx(51 / 101, abs=1e-12)


def test_coco_matching_lets_duplicate_take_free_ground_truth(duplicate_example) -> None:
    result = coco_map(*duplicate_example, num_classes=1)
    assert result["map"] == pytest.approx(684.5 / 1010, abs=1e-12)
    assert result["map50"] == pytest.approx(1.0, abs=1e-12)
    assert result["map75"] == pytest.approx(51 / 101, abs=1e-12)
    stats = _pycocotools_stats(*duplicate_example, num_classes=1)
    assert [result["map"], result["map50"], result["map75"]] == pytest.approx(stats[:3], abs=1e-9)


# One image: regular g1 = [0, 0, 10, 10], difficult g2 = [1, 0, 11, 10]; detection e equal to g2.
# IoU(e, g2) = 1, IoU(e, g1) = 90/110 = 0.818.
# VOC: the best match g2 is difficult -> e ignored -> no counted detection, AP 0.
# COCO prefers a free regular ground truth over any ignored one: e takes g1 (TP) for thresholds
# .50 .. .80 (7 of them, AP 1) and falls back to g2 (ignored, AP 0) for .85 .. .95.
#   map = 7/10, map50 = map75 = 1
def test_coco_matching_prefers_regular_over_difficult_ground_truth() -> None:
    predictions = [_prediction([[1, 0, 11, 10]], [0.9], [0])]
    ground_truths = [_truth([[0, 0, 10, 10], [1, 0, 11, 10]], [0, 0], [False, True])]
    assert evaluate_detections(predictions, ground_truths, num_classes=1)["map"] == 0.0
    result = coco_map(predictions, ground_truths, num_classes=1)
    assert result == {
        "map": pytest.approx(0.7, abs=1e-12),
        "map50": pytest.approx(1.0, abs=1e-12),
        "map75": pytest.approx(1.0, abs=1e-12),
    }
    stats = _pycocotools_stats(predictions, ground_truths, num_classes=1)
    assert [result["map"], result["map50"], result["map75"]] == pytest.approx(stats[:3], abs=1e-9)


# Tie: g1 = [0, 0, 10, 10], g2 = [2, 0, 12, 10]; e1 0.9 [1, 0, 11, 10] has IoU 90/110 with both.
# COCOeval keeps the last of equal IoUs, so e1 takes g2; e2 0.8 = g2 then has only g1 left, at
# IoU 80/120 = 0.667: TP up to .65, FP from .70. At .75: TP FP -> AP 51/101 (first-wins gives 1).
def test_coco_matching_breaks_iou_ties_like_pycocotools() -> None:
    predictions = [_prediction([[1, 0, 11, 10], [2, 0, 12, 10]], [0.9, 0.8], [0, 0])]
    ground_truths = [_truth([[0, 0, 10, 10], [2, 0, 12, 10]], [0, 0])]
    result = coco_map(predictions, ground_truths, num_classes=1)
    assert result["map75"] == pytest.approx(51 / 101, abs=1e-12)
    stats = _pycocotools_stats(predictions, ground_truths, num_classes=1)
    assert [result["map"], result["map50"], result["map75"]] == pytest.approx(stats[:3], abs=1e-9)


# ------------------------------------------------------------------------------- edge cases
def test_class_without_ground_truth_is_nan_and_left_out_of_mean() -> None:
    predictions = [_prediction([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.8], [0, 1])]
    # class 2 has only a difficult ground truth: no positives either
    ground_truths = [_truth([[0, 0, 10, 10], [30, 30, 40, 40]], [0, 2], [False, True])]
    for interpolation in INTERPOLATIONS:
        result = evaluate_detections(
            predictions, ground_truths, num_classes=3, interpolation=interpolation
        )
        assert result["ap"][0] == pytest.approx(1.0, abs=1e-12)
        assert math.isnan(result["ap"][1]) and math.isnan(result["ap"][2])
        assert result["map"] == pytest.approx(1.0, abs=1e-12)
    assert coco_map(predictions, ground_truths, num_classes=3)["map"] == pytest.approx(1.0)


def test_no_ground_truth_at_all_gives_nan() -> None:
    result = evaluate_detections([], [], num_classes=2)
    assert math.isnan(result["map"]) and len(result["ap"]) == 2
    assert all(math.isnan(ap) for ap in result["ap"])
    assert all(math.isnan(value) for value in coco_map([], [], num_classes=2).values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perfect_predictions_give_one(seed: int) -> None:
    _, ground_truths = _random_dataset(seed, difficult_rate=0.0)
    generator = torch.Generator().manual_seed(seed)
    predictions = [
        {
            "boxes": truth["boxes"].clone(),
            "scores": torch.rand(len(truth["boxes"]), generator=generator),
            "labels": truth["labels"].clone(),
        }
        for truth in ground_truths
    ]
    for interpolation in INTERPOLATIONS:
        result = evaluate_detections(
            predictions, ground_truths, num_classes=3, interpolation=interpolation
        )
        assert result["map"] == pytest.approx(1.0, abs=1e-12)
    assert coco_map(predictions, ground_truths, num_classes=3) == {
        "map": pytest.approx(1.0, abs=1e-12),
        "map50": pytest.approx(1.0, abs=1e-12),
        "map75": pytest.approx(1.0, abs=1e-12),
    }


def test_empty_predictions_give_zero() -> None:
    _, ground_truths = _random_dataset(0, difficult_rate=0.0)
    empty = {
        "boxes": torch.empty((0, 4)),
        "scores": torch.empty(0),
        "labels": torch.empty(0, dtype=torch.int64),
    }
    predictions = [empty] * len(ground_truths)
    for interpolation in INTERPOLATIONS:
        result = evaluate_detections(
            predictions, ground_truths, num_classes=3, interpolation=interpolation
        )
        assert result == {"map": 0.0, "ap": [0.0, 0.0, 0.0]}
    assert coco_map(predictions, ground_truths, num_classes=3) == {
        "map": 0.0,
        "map50": 0.0,
        "map75": 0.0,
    }


def test_accepts_float32_and_no_difficult_key() -> None:
    predictions, ground_truths = _random_dataset(3, difficult_rate=0.0)
    as_float32 = [
        {**p, "boxes": p["boxes"].float(), "scores": p["scores"].float()} for p in predictions
    ]
    without_difficult = [{k: v for k, v in t.items() if k != "difficult"} for t in ground_truths]
    expected = evaluate_detections(predictions, ground_truths, 3, interpolation="all")
    result = evaluate_detections(as_float32, without_difficult, 3, interpolation="all")
    assert result["map"] == pytest.approx(expected["map"], abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"interpolation": "11-point"}, "interpolation must be one of"),
        ({"interpolation": "COCO"}, "'COCO'"),
        ({"iou_threshold": 1.5}, r"iou_threshold must be in \[0, 1\], got 1.5"),
        ({"num_classes": 0}, "num_classes must be a positive int, got 0"),
    ],
)
def test_bad_arguments_raise_value_error(hand_example, kwargs: dict, match: str) -> None:
    arguments = {"num_classes": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        evaluate_detections(*hand_example, **arguments)


def test_bad_inputs_raise_value_error(hand_example) -> None:
    predictions, ground_truths = hand_example
    with pytest.raises(ValueError, match="aligned per image, got 2 and 1"):
        evaluate_detections(predictions, ground_truths[:1], num_classes=1)
    with pytest.raises(
        ValueError, match=r"predictions\[0\]\['labels'\] must be in \[0, 1\), got 3"
    ):
        bad = [{**predictions[0], "labels": torch.tensor([0, 3, 0])}, predictions[1]]
        evaluate_detections(bad, ground_truths, num_classes=1)
    with pytest.raises(ValueError, match=r"ground_truths\[1\]\['boxes'\] must be \(K, 4\)"):
        bad = [ground_truths[0], {**ground_truths[1], "boxes": torch.zeros(2, 5)}]
        coco_map(predictions, bad, num_classes=1)
    with pytest.raises(ValueError, match=r"predictions\[1\] has 3 boxes, 2 scores"):
        bad = [predictions[0], {**predictions[1], "scores": torch.tensor([0.5, 0.4])}]
        evaluate_detections(bad, ground_truths, num_classes=1)


# ------------------------------------------------------------------- VOC devkit reference
def _voc_reference(
    predictions: list[dict],
    ground_truths: list[dict],
    num_classes: int,
    iou_threshold: float,
    interpolation: str,
) -> list[float]:
    """Per-class AP, a literal numpy port of the VOC devkit (py-faster-rcnn's voc_eval).

    Deviations, each matching model.metrics' documented choices: continuous IoU (no +1), a hit is
    IoU >= threshold (as the MATLAB devkit), stable score sort.
    Ignored detections stay in the cumulative sums as zero-width steps, as in the devkit.
    """
    aps = []
    for cls in range(num_classes):
        records = {}
        num_positives = 0
        for image, truth in enumerate(ground_truths):
            keep = truth["labels"].numpy() == cls
            difficult = truth["difficult"].numpy()[keep]
            records[image] = [truth["boxes"].numpy()[keep], difficult, np.zeros(keep.sum(), bool)]
            num_positives += int((~difficult).sum())
        image_ids, confidence, boxes = [], [], []
        for image, prediction in enumerate(predictions):
            keep = prediction["labels"].numpy() == cls
            image_ids += [image] * int(keep.sum())
            confidence.append(prediction["scores"].numpy()[keep])
            boxes.append(prediction["boxes"].numpy()[keep])
        confidence, boxes = np.concatenate(confidence), np.concatenate(boxes)
        order = np.argsort(-confidence, kind="stable")
        tp = np.zeros(len(order))
        fp = np.zeros(len(order))
        for d, index in enumerate(order):
            gt_boxes, difficult, taken = records[image_ids[index]]
            bb = boxes[index]
            ovmax = -np.inf
            if gt_boxes.size > 0:
                iw = np.maximum(
                    np.minimum(gt_boxes[:, 2], bb[2]) - np.maximum(gt_boxes[:, 0], bb[0]), 0.0
                )
                ih = np.maximum(
                    np.minimum(gt_boxes[:, 3], bb[3]) - np.maximum(gt_boxes[:, 1], bb[1]), 0.0
                )
                inters = iw * ih
                union = (
                    (bb[2] - bb[0]) * (bb[3] - bb[1])
                    + (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
                    - inters
                )
                overlaps = inters / union
                ovmax, jmax = overlaps.max(), overlaps.argmax()
            if ovmax >= iou_threshold:
                if not difficult[jmax]:
                    if not taken[jmax]:
                        tp[d] = 1.0
                        taken[jmax] = True
                    else:
                        fp[d] = 1.0
            else:
                fp[d] = 1.0
        if num_positives == 0:
            aps.append(math.nan)
            continue
        fp, tp = np.cumsum(fp), np.cumsum(tp)
        recall = tp / num_positives
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps.append(_voc_ap_reference(recall, precision, interpolation))
    return aps


def _voc_ap_reference(recall: np.ndarray, precision: np.ndarray, interpolation: str) -> float:
    if interpolation == "all":
        mrec = np.concatenate(([0.0], recall, [1.0]))
        mpre = np.concatenate(([0.0], precision, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = max(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    thresholds = np.arange(0.0, 1.1, 0.1) if interpolation == "11point" else np.linspace(0, 1, 101)
    sampled = [precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in thresholds]
    return float(np.mean(sampled))


def _random_dataset(
    seed: int,
    num_images: int = 6,
    num_classes: int = 3,
    difficult_rate: float = 0.2,
) -> tuple[list[dict], list[dict]]:
    """Ground truths and noisy detections: jittered copies (duplicates, relabels) and clutter."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64)

    def randint(high: int, *shape: int) -> Tensor:
        return torch.randint(high, shape, generator=generator)

    predictions, ground_truths = [], []
    for _ in range(num_images):
        num_gts = int(randint(6))
        corner, size = uniform(num_gts, 2) * 80, 5 + uniform(num_gts, 2) * 30
        gt_boxes = torch.cat([corner, corner + size], dim=1)  # (G, 4) xyxy
        gt_labels = randint(num_classes, num_gts)
        ground_truths.append(
            {
                "boxes": gt_boxes,
                "labels": gt_labels,
                "difficult": uniform(num_gts) < difficult_rate,
            }
        )

        copies = randint(4, num_gts)  # 0 to 3 detections per ground truth
        source = torch.repeat_interleave(torch.arange(num_gts), copies)
        jitter = (uniform(len(source), 4) - 0.5) * 0.5 * size[source].repeat(1, 2)
        det_labels = gt_labels[source].clone()
        relabel = uniform(len(source)) < 0.15
        det_labels[relabel] = randint(num_classes, int(relabel.sum()))
        num_clutter = int(randint(5))
        corner, size_clutter = uniform(num_clutter, 2) * 80, 5 + uniform(num_clutter, 2) * 30
        predictions.append(
            {
                "boxes": torch.cat(
                    [gt_boxes[source] + jitter, torch.cat([corner, corner + size_clutter], 1)]
                ),
                "scores": uniform(len(source) + num_clutter),
                "labels": torch.cat([det_labels, randint(num_classes, num_clutter)]),
            }
        )
    return predictions, ground_truths


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("seed", range(4))
def test_matches_voc_devkit_reference(seed: int, iou_threshold: float, interpolation: str) -> None:
    predictions, ground_truths = _random_dataset(seed)
    result = evaluate_detections(
        predictions, ground_truths, 3, iou_threshold=iou_threshold, interpolation=interpolation
    )
    expected = _voc_reference(predictions, ground_truths, 3, iou_threshold, interpolation)
    torch.testing.assert_close(
        torch.tensor(result["ap"]), torch.tensor(expected), equal_nan=True, rtol=0, atol=1e-12
    )
    assert result["map"] == pytest.approx(float(np.nanmean(expected)), abs=1e-12)


# k of 10 objects found, each by one exact detection (precision 1 up to recall k / 10). The
# devkit's thresholds np.arange(0, 1.1, 0.1) hold 0.30000000000000004, 0.6000000000000001 and
# 0.7000000000000001, which a recall of exactly 3/10, 6/10 or 7/10 does not reach: precision 1 is
# sampled at the k thresholds 0 ... (k - 1) / 10 only, so AP = k / 11 (with k / 10: (k + 1) / 11).
@pytest.mark.parametrize("found", [3, 6, 7])
def test_11point_recall_on_a_devkit_threshold_like_the_devkit(found: int) -> None:
    boxes = [[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(10)]
    truth = [_truth(boxes, [0] * 10, [False] * 10)]
    prediction = [_prediction(boxes[:found], [1.0 - i / 100 for i in range(found)], [0] * found)]
    result = evaluate_detections(prediction, truth, num_classes=1, interpolation="11point")
    assert result["ap"] == [pytest.approx(found / 11, abs=1e-12)]
    assert result["ap"] == _voc_reference(prediction, truth, 1, 0.5, "11point")


# --------------------------------------------------------------------- pycocotools reference
def _pycocotools_stats(
    predictions: list[dict], ground_truths: list[dict], num_classes: int
) -> list[float]:
    """COCOeval's 12 bbox stats. A difficult ground truth is given an area outside COCOeval's
    "all" range (at most 1e10), the only way to make it ignore a non-crowd ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    annotations, results = [], []
    for image, (prediction, truth) in enumerate(zip(predictions, ground_truths, strict=True)):
        difficult = truth.get("difficult", torch.zeros(len(truth["boxes"]), dtype=torch.bool))
        for box, label, is_difficult in zip(
            truth["boxes"].tolist(), truth["labels"].tolist(), difficult.tolist(), strict=True
        ):
            x1, y1, x2, y2 = box
            area = 1e11 if is_difficult else (x2 - x1) * (y2 - y1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image + 1,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": area,
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(
            prediction["boxes"].tolist(),
            prediction["scores"].tolist(),
            prediction["labels"].tolist(),
            strict=True,
        ):
            x1, y1, x2, y2 = box
            results.append(
                {
                    "image_id": image + 1,
                    "category_id": label + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        truth_api = COCO()
        truth_api.dataset = {
            "images": [{"id": image + 1} for image in range(len(ground_truths))],
            "categories": [{"id": cls + 1} for cls in range(num_classes)],
            "annotations": annotations,
        }
        truth_api.createIndex()
        evaluator = COCOeval(truth_api, truth_api.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(value) for value in evaluator.stats]


@pytest.mark.parametrize("difficult_rate", [0.0, 0.3])
@pytest.mark.parametrize("seed", range(5))
def test_coco_map_matches_pycocotools(seed: int, difficult_rate: float) -> None:
    predictions, ground_truths = _random_dataset(seed, num_images=8, difficult_rate=difficult_rate)
    result = coco_map(predictions, ground_truths, num_classes=3)
    stats = _pycocotools_stats(predictions, ground_truths, num_classes=3)
    assert [result["map"], result["map50"], result["map75"]] == pytest.approx(stats[:3], abs=1e-9)


def test_coco_map_keeps_100_detections_per_image_and_class_like_pycocotools(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    predictions, ground_truths = _random_dataset(7, num_images=3, difficult_rate=0.0)
    generator = torch.Generator().manual_seed(7)
    # Image 0: 120 confident class-0 false positives far from every box, then a low-scored hit on
    # each class-0 ground truth. Only the top 100 count, so those hits must be dropped.
    truth = _truth([[0, 0, 20, 20], [40, 40, 70, 60]], [0, 0])
    corner = 200 + torch.rand((120, 2), generator=generator, dtype=torch.float64) * 50
    predictions[0] = {
        "boxes": torch.cat([torch.cat([corner, corner + 10], dim=1), truth["boxes"] + 0.5]),
        "scores": torch.cat(
            [
                0.5 + torch.rand(120, generator=generator, dtype=torch.float64) / 2,
                torch.tensor([0.1, 0.05], dtype=torch.float64),
            ]
        ),
        "labels": torch.zeros(122, dtype=torch.int64),
    }
    ground_truths[0] = truth
    result = coco_map(predictions, ground_truths, num_classes=3)
    stats = _pycocotools_stats(predictions, ground_truths, num_classes=3)
    assert [result["map"], result["map50"], result["map75"]] == pytest.approx(stats[:3], abs=1e-9)

    # and the cap is what makes it agree: without it the two late hits would count
    monkeypatch.setattr(metrics, "_COCO_MAX_DETECTIONS", None)
    uncapped = coco_map(predictions, ground_truths, num_classes=3)
    assert uncapped["map50"] > result["map50"] + 1e-3


def test_best_f1_threshold_hand_worked():
    from model.metrics import best_f1_threshold

    # One image, one class, two ground truths. Detections by score: 0.9 hit, 0.8 miss,
    # 0.6 hit, 0.3 miss. F1 after k kept: k=1: 2*1/(1+2)=0.667; k=2: 2*1/(2+2)=0.5;
    # k=3: 2*2/(3+2)=0.8; k=4: 2*2/(4+2)=0.667 -> best at k=3, threshold 0.6.
    gt = [
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]),
            "labels": torch.tensor([0, 0]),
        }
    ]
    pred = [
        {
            "boxes": torch.tensor(
                [[0.0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30], [70, 70, 80, 80]]
            ),
            "scores": torch.tensor([0.9, 0.8, 0.6, 0.3]),
            "labels": torch.tensor([0, 0, 0, 0]),
        }
    ]
    assert best_f1_threshold(pred, gt, num_classes=1) == pytest.approx(0.6)
    empty = [
        {
            "boxes": torch.empty(0, 4),
            "scores": torch.empty(0),
            "labels": torch.empty(0, dtype=torch.long),
        }
    ]
    assert math.isnan(best_f1_threshold(empty, gt, num_classes=1))
