"""From the raw grid to detections: per-class scores, thresholding and class-wise NMS."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from model.boxes import decode_predictions


def candidates(pred: torch.Tensor, B: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (box, class) pair of the raw grid, before any threshold: boxes and their scores.

    Args:
        pred: (N, S, S, C + 5B) raw network output.

    Returns:
        ``boxes`` (N, S*S*B, 4) xyxy normalised to [0, 1] and clipped, and ``scores``
        (N, S*S*B, C): ``conf * class_score`` with both factors clamped to [0, 1] (the outputs
        are linear: two negatives must not make a positive score, and a score is a
        probability, also for imported Darknet weights whose outputs overshoot 1). The ONNX
        export computes these in its graph with this same function.
    """
    N, S = pred.shape[0], pred.shape[1]
    M = S * S * B  # boxes per image
    pred = pred.float()
    boxes, conf = decode_predictions(pred, B, C)  # (N, S, S, B, 4), (N, S, S, B)
    boxes = boxes.reshape(N, M, 4).clamp(0, 1)  # (N, S*S*B, 4)
    class_scores = pred[..., :C].clamp(0, 1).unsqueeze(3)  # (N, S, S, 1, C)
    scores = (conf.clamp(0, 1).unsqueeze(-1) * class_scores).reshape(N, M, C)  # (N, S*S*B, C)
    return boxes, scores


def postprocess(
    pred: torch.Tensor,
    B: int = 2,
    C: int = 20,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """Turn the raw grid into detections, one dict per image.

    The score of a (box, class) pair is ``conf * class_score`` over all S*S*B boxes (see
    ``candidates``), so one box may give several classes. Pairs at or under ``conf_threshold``
    are dropped, then NMS runs per image and class (``torchvision.ops.batched_nms``).

    Args:
        pred: (N, S, S, C + 5B) raw network output.

    Returns:
        N dicts with ``boxes`` (K, 4) xyxy normalised to [0, 1] and clipped, ``scores`` (K,)
        sorted in decreasing order, ``labels`` (K,) int64; K <= ``max_detections``.
    """
    if not 0.0 <= conf_threshold <= 1.0:
        raise ValueError(f"conf_threshold must be in [0, 1], got {conf_threshold}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    N = pred.shape[0]
    boxes, scores = candidates(pred, B, C)  # (N, S*S*B, 4), (N, S*S*B, C)
    image_idx, box_idx, labels = (scores > conf_threshold).nonzero(as_tuple=True)
    kept_boxes = boxes[image_idx, box_idx]
    kept_scores = scores[image_idx, box_idx, labels]
    # One NMS call for the whole batch: each (image, class) pair is its own group.
    keep = batched_nms(kept_boxes, kept_scores, image_idx * C + labels, iou_threshold)
    image_idx = image_idx[keep]
    results = []
    for n in range(N):
        mine = keep[image_idx == n][:max_detections]  # batched_nms sorts by decreasing score
        results.append(
            {"boxes": kept_boxes[mine], "scores": kept_scores[mine], "labels": labels[mine]}
        )
    return results
