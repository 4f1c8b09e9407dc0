"""The YOLOv1 loss (Redmon et al. 2016, eq. 3) with the semantics of Darknet's detection layer."""

from __future__ import annotations

import torch
from torch import nn

from model.boxes import cell_xywh_to_xyxy, paired_box_iou


class YOLOv1Loss(nn.Module):
    """Sum-squared YOLOv1 loss, summed over cells and divided by the batch size N.

    In an object cell the responsible predictor is the one whose decoded box has the highest IoU
    with the ground truth (no gradient through the choice); when every IoU is 0 it is the one
    closest in (x, y, sqrt_w, sqrt_h). The responsible predictor's confidence target is that IoU
    (detached). Every other predictor, in every cell, gets the no-object term, including the
    second predictor of an object cell.

    Soft targets (``encode_targets`` with a teacher's ``objectness`` p and class distribution):
    the loss is its expectation over whether the cell holds an object, which it does with
    probability p: the responsible predictor's coordinate, object and class terms are weighted
    by p and its no-object term by 1 - p. With hard targets (p = 1 or 0) this is the loss above.
    """

    def __init__(
        self,
        S: int = 7,
        B: int = 2,
        C: int = 20,
        lambda_coord: float = 5.0,
        lambda_noobj: float = 0.5,
    ):
        super().__init__()
        self.S, self.B, self.C = S, B, C
        self.lambda_coord = lambda_coord
        self.lambda_noobj = lambda_noobj

    def terms(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The four loss terms, each already weighted and divided by N.

        Args:
            pred: (N, S, S, C + 5B) raw network output.
            target: (N, S, S, C + 5) from ``encode_targets``.
        """
        S, B, C = self.S, self.B, self.C
        N = pred.shape[0]
        if pred.shape[1:] != (S, S, C + 5 * B):
            raise ValueError(f"pred must be (N, {S}, {S}, {C + 5 * B}), got {tuple(pred.shape)}")
        if target.shape != (N, S, S, C + 5):
            raise ValueError(f"target must be ({N}, {S}, {S}, {C + 5}), got {tuple(target.shape)}")
        pred = pred.float()
        box = pred[..., C:].reshape(N, S, S, B, 5)  # (N, S, S, B, [conf, x, y, sqrt_w, sqrt_h])
        obj = target[..., C]  # (N, S, S)
        gt_xywh = target[..., C + 1 : C + 5]  # (N, S, S, 4), w and h not square-rooted
        gt_xy_sqrt_wh = torch.cat((gt_xywh[..., :2], gt_xywh[..., 2:].clamp(min=0).sqrt()), -1)

        with torch.no_grad():
            pred_xywh = torch.cat((box[..., 1:3], box[..., 3:5].square()), dim=-1)
            iou = paired_box_iou(
                cell_xywh_to_xyxy(pred_xywh, S), cell_xywh_to_xyxy(gt_xywh, S).unsqueeze(3)
            )  # (N, S, S, B)
            dist = (box[..., 1:5] - gt_xy_sqrt_wh.unsqueeze(3)).square().sum(-1)  # (N, S, S, B)
            best_iou, best = iou.max(-1)
            best = torch.where(best_iou > 0, best, dist.argmin(-1))  # (N, S, S)
            chosen = nn.functional.one_hot(best, B).to(pred.dtype)  # (N, S, S, B)
            responsible = chosen * obj.unsqueeze(-1)  # weight p of the object case
            conf_target = iou * chosen  # the object case's target, whatever its probability

        coord_err = (box[..., 1:5] - gt_xy_sqrt_wh.unsqueeze(3)).square().sum(-1)
        conf = box[..., 0]
        class_err = (pred[..., :C] - target[..., :C]).square().sum(-1)  # (N, S, S)
        return {
            "coord": self.lambda_coord * (responsible * coord_err).sum() / N,
            "object": (responsible * (conf - conf_target).square()).sum() / N,
            "noobj": self.lambda_noobj * ((1 - responsible) * conf.square()).sum() / N,
            "class": (obj * class_err).sum() / N,
        }

    def dense_term(
        self, pred: torch.Tensor, target: torch.Tensor, q: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        """The dense distillation term (``model.distill``), divided by N: in every cell, with
        the weight ``w`` (N, S, S) times the probability that the cell holds no target object,
        the squared error of the class scores against the teacher's ``q`` (N, S, S, C). Object
        cells keep ``terms``' class term alone."""
        C = self.C
        absent = 1 - target[..., C]
        err = (pred[..., :C].float() - q).square().sum(-1)
        return (w * absent * err).sum() / pred.shape[0]

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Total loss, a scalar; see ``terms`` for the parts."""
        return torch.stack(list(self.terms(pred, target).values())).sum()
