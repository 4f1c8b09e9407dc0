"""Pure box maths for the YOLOv1 grid: target encoding, grid decoding, element-wise IoU.

Boxes are ``xyxy`` normalised to [0, 1] unless a name says otherwise. Grid row ``i`` runs along
y and column ``j`` along x, so the cell of a centre ``(cx, cy)`` is ``(floor(S*cy), floor(S*cx))``.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F


def hard_targets(labels: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Annotated boxes as soft targets: one-hot class distributions (K, C), objectness 1 (K,)."""
    return torch.nn.functional.one_hot(labels, C).float(), torch.ones(len(labels))


def encode_targets(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    S: int,
    C: int,
    class_probs: torch.Tensor | None = None,
    objectness: torch.Tensor | None = None,
) -> torch.Tensor:
    """Encode one image's boxes as the training target grid.

    Args:
        boxes: (K, 4) xyxy normalised to [0, 1].
        labels: (K,) int class indices in [0, C).
        S: grid size; C: number of classes.
        class_probs, objectness: soft targets (a teacher's), both or neither: (K, C) class
            distributions written instead of the one-hot ``labels``, and (K,) probabilities
            that each box is an object, written instead of 1 (``YOLOv1Loss`` weighs the
            object and no-object terms of the cell by it).

    Returns:
        (S, S, C + 5): per cell ``[one-hot class | objectness | x_cell, y_cell, w, h]``, with
        ``x_cell, y_cell`` the centre's offset inside the cell and ``w, h`` relative to the image.
        YOLOv1 has one target per cell: when several centres fall in one cell the largest box
        (by area) is kept and the others are dropped.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape (K, 4), got {tuple(boxes.shape)}")
    if labels.shape != boxes.shape[:1]:
        raise ValueError(f"labels must have shape ({boxes.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= C):
        raise ValueError(f"labels must lie in [0, {C}), got {labels.tolist()}")
    if (class_probs is None) != (objectness is None):
        raise ValueError("class_probs and objectness go together: give both or neither")
    if class_probs is None:
        class_probs, objectness = hard_targets(labels, C)
    if class_probs.shape != (len(labels), C) or objectness.shape != labels.shape:
        raise ValueError(
            f"class_probs must be ({len(labels)}, {C}) and objectness ({len(labels)},), got "
            f"{tuple(class_probs.shape)} and {tuple(objectness.shape)}"
        )
    target = torch.zeros((S, S, C + 5), dtype=torch.float32)
    boxes = boxes.float()
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    cells = (centre * S).floor().long().clamp(0, S - 1)  # (K, 2) as (j, i)
    offsets = centre * S - cells
    # Smallest first, so that a larger box written later wins its cell.
    for k in torch.argsort(wh[:, 0] * wh[:, 1]).tolist():
        j, i = cells[k].tolist()
        target[i, j] = 0
        target[i, j, :C] = class_probs[k]
        target[i, j, C] = objectness[k]
        target[i, j, C + 1 : C + 3] = offsets[k]
        target[i, j, C + 3 : C + 5] = wh[k]
    return target


def box_cells(boxes: torch.Tensor, labels: torch.Tensor, S: int) -> torch.Tensor:
    """Which box's class each cell of an S x S grid lies in.

    Args:
        boxes: (K, 4) xyxy normalised to [0, 1]; labels: (K,) int class indices.

    Returns:
        (S, S) long, row ``i`` (y) then column ``j`` (x): the label of the smallest box whose
        area holds the cell's centre, -1 in cells whose centre no box holds.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
        raise ValueError(
            f"boxes must be (K, 4) and labels (K,), got {tuple(boxes.shape)} and "
            f"{tuple(labels.shape)}"
        )
    cells = torch.full((S, S), -1, dtype=torch.long)
    centres = (torch.arange(S, dtype=torch.float32) + 0.5) / S
    boxes = boxes.float()
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(-1)
    # Largest first, so that a smaller box written later wins the cells it shares.
    for k in torch.argsort(area, descending=True, stable=True).tolist():
        x1, y1, x2, y2 = boxes[k].tolist()
        cols = (centres >= x1) & (centres <= x2)
        rows = (centres >= y1) & (centres <= y2)
        cells[rows[:, None] & cols[None, :]] = int(labels[k])
    return cells


def cell_xywh_to_xyxy(xywh: torch.Tensor, S: int) -> torch.Tensor:
    """Map per-cell boxes to image boxes.

    Args:
        xywh: (N, S, S, ..., 4) with ``x, y`` the offset in the cell and ``w, h`` relative to
            the image; dimension 1 is the row ``i`` (y) and 2 the column ``j`` (x).

    Returns:
        Same shape, xyxy normalised to [0, 1] (not clipped).
    """
    extra = xywh.ndim - 4
    idx = torch.arange(S, device=xywh.device, dtype=xywh.dtype)
    cols = idx.view(1, 1, S, *([1] * extra))
    rows = idx.view(1, S, 1, *([1] * extra))
    cx = (xywh[..., 0] + cols) / S
    cy = (xywh[..., 1] + rows) / S
    half_w, half_h = xywh[..., 2] / 2, xywh[..., 3] / 2
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def decode_predictions(pred: torch.Tensor, B: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the raw grid into decoded boxes and confidences.

    Args:
        pred: (N, S, S, C + 5B) raw network output.

    Returns:
        boxes (N, S, S, B, 4) xyxy normalised (not clipped; ``w = sqrt_w ** 2``) and
        confidences (N, S, S, B).
    """
    N, S = pred.shape[0], pred.shape[1]
    if pred.ndim != 4 or pred.shape[2] != S or pred.shape[3] != C + 5 * B:
        raise ValueError(f"pred must have shape (N, S, S, {C + 5 * B}), got {tuple(pred.shape)}")
    box = pred[..., C:].reshape(N, S, S, B, 5)  # (N, S, S, B, [conf, x, y, sqrt_w, sqrt_h])
    xywh = torch.cat((box[..., 1:3], box[..., 3:5].square()), dim=-1)
    return cell_xywh_to_xyxy(xywh, S), box[..., 0]


def decode_targets(target: torch.Tensor, C: int) -> list[dict[str, torch.Tensor]]:
    """Read the boxes back out of encoded targets (N, S, S, C + 5).

    Returns one dict per image with ``boxes`` (K, 4) xyxy normalised and ``labels`` (K,), in
    row-major cell order.
    """
    S = target.shape[1]
    boxes = cell_xywh_to_xyxy(target[..., C + 1 : C + 5], S)  # (N, S, S, 4)
    out = []
    for n in range(target.shape[0]):
        mask = target[n, ..., C] > 0
        out.append({"boxes": boxes[n][mask], "labels": target[n, ..., :C][mask].argmax(-1)})
    return out


def paired_box_iou(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding boxes, (..., 4) and (..., 4) -> (...); 0 where the union is empty.

    torchvision's ``box_iou`` gives the all-pairs (K, M) matrix; the loss needs the element-wise
    IoU of aligned predictor/target pairs.
    """
    top_left = torch.maximum(boxes1_xyxy[..., :2], boxes2_xyxy[..., :2])
    bottom_right = torch.minimum(boxes1_xyxy[..., 2:], boxes2_xyxy[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area1 = (boxes1_xyxy[..., 2:] - boxes1_xyxy[..., :2]).clamp(min=0).prod(-1)
    area2 = (boxes2_xyxy[..., 2:] - boxes2_xyxy[..., :2]).clamp(min=0).prod(-1)
    union = area1 + area2 - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def unmirror_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel xyxy boxes (K, 4) found on the mirror image of a ``width`` x ``height`` image, on
    the image itself (torchvision's horizontal box flip)."""
    xyxy = tv_tensors.BoundingBoxFormat.XYXY
    return F.horizontal_flip_bounding_boxes(boxes, format=xyxy, canvas_size=(height, width))
