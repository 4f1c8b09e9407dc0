import math

import pytest
import torch

from model import YOLOv1Loss, encode_targets


def reference_loss(pred, target, S, B, C, l_coord=5.0, l_noobj=0.5):
    """A deliberately plain per-cell loop over the paper's loss with Darknet's choices."""
    N = pred.shape[0]
    total = 0.0
    for n in range(N):
        for i in range(S):
            for j in range(S):
                p, t = pred[n, i, j].tolist(), target[n, i, j].tolist()
                has_obj = t[C] == 1
                responsible = -1
                if has_obj:
                    tx, ty, tw, th = t[C + 1 : C + 5]
                    ious, dists = [], []
                    for b in range(B):
                        conf, x, y, sw, sh = p[C + 5 * b : C + 5 * b + 5]
                        ious.append(iou_cell(x, y, sw * sw, sh * sh, tx, ty, tw, th, S))
                        dists.append(
                            (x - tx) ** 2 + (y - ty) ** 2
                            + (sw - math.sqrt(tw)) ** 2 + (sh - math.sqrt(th)) ** 2
                        )  # fmt: skip
                    if max(ious) > 0:
                        responsible = ious.index(max(ious))
                    else:
                        responsible = dists.index(min(dists))
                    _, x, y, sw, sh = p[C + 5 * responsible : C + 5 * responsible + 5]
                    total += l_coord * dists[responsible]
                    total += (p[C + 5 * responsible] - ious[responsible]) ** 2
                    total += sum((p[c] - t[c]) ** 2 for c in range(C))
                for b in range(B):
                    if b != responsible:
                        total += l_noobj * p[C + 5 * b] ** 2
    return total / N


def iou_cell(x, y, w, h, tx, ty, tw, th, S):
    """IoU of two boxes given by cell offsets (same cell) and image-relative sizes."""
    ax1, ax2 = x / S - w / 2, x / S + w / 2
    ay1, ay2 = y / S - h / 2, y / S + h / 2
    bx1, bx2 = tx / S - tw / 2, tx / S + tw / 2
    by1, by2 = ty / S - th / 2, ty / S + th / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = w * h + tw * th - inter
    return inter / union if union > 0 else 0.0


def random_batch(seed, N=3, S=4, B=2, C=5, boxes_per_image=4):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(N):
        xy = torch.rand(boxes_per_image, 2, generator=g) * 0.7
        wh = torch.rand(boxes_per_image, 2, generator=g) * 0.3 + 0.02
        boxes = torch.cat((xy, xy + wh), 1)
        labels = torch.randint(0, C, (boxes_per_image,), generator=g)
        targets.append(encode_targets(boxes, labels, S, C))
    target = torch.stack(targets)
    pred = torch.rand(N, S, S, C + 5 * B, generator=g)
    # Make some predicted boxes overlap their targets and some miss entirely (IoU 0 fallback).
    pred[..., C:].view(N, S, S, B, 5)[..., 3:5].mul_(0.6)
    return pred, target


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("S", "B", "C"), [(4, 2, 5), (3, 3, 2)])
def test_loss_equals_plain_loop(seed, S, B, C):
    pred, target = random_batch(seed, S=S, B=B, C=C)
    loss = YOLOv1Loss(S, B, C)(pred, target)
    expected = reference_loss(pred.double(), target.double(), S, B, C)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.8, 1.0])
def test_soft_objectness_is_the_expected_loss_over_object_and_no_object(p):
    """A cell whose object exists with probability p costs p * (the loss if it does) +
    (1 - p) * (the loss if it does not), each from the plain loop."""
    S, B, C = 4, 2, 5
    pred, target = random_batch(3, S=S, B=B, C=C)
    n, i, j = (target[..., C] == 1).nonzero()[0].tolist()  # one object cell
    target[n, i, j, :C] = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.1])  # a class distribution
    present, absent, soft = target.clone(), target.clone(), target.clone()
    absent[n, i, j] = 0
    soft[n, i, j, C] = p
    loss = YOLOv1Loss(S, B, C)(pred, soft)
    expected = p * reference_loss(pred.double(), present.double(), S, B, C) + (
        1 - p
    ) * reference_loss(pred.double(), absent.double(), S, B, C)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_zero_iou_falls_back_to_the_nearest_predictor():
    S, B, C = 2, 2, 1
    target = encode_targets(torch.tensor([[0.1, 0.1, 0.2, 0.2]]), torch.tensor([0]), S, C)[None]
    pred = torch.zeros(1, S, S, C + 5 * B)
    # Both predictors have zero-size boxes (IoU 0); predictor 1 sits on the target's centre.
    pred[0, 0, 0, C + 5 : C + 8] = torch.tensor([0.0, 0.3, 0.3])
    pred[0, 0, 0, C + 1 : C + 3] = torch.tensor([0.9, 0.9])
    terms = YOLOv1Loss(S, B, C).terms(pred, target)
    expected_coord = 5.0 * (0.0 + 0.0 + 0.1 + 0.1)  # (sqrt_w - sqrt(0.1))^2 with sqrt_w = 0
    assert terms["coord"].item() == pytest.approx(expected_coord, rel=1e-5)


def test_perfect_prediction_has_no_coord_or_class_loss():
    S, B, C = 7, 2, 20
    boxes = torch.tensor([[0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.9, 0.8]])
    target = encode_targets(boxes, torch.tensor([3, 7]), S, C)[None]
    pred = torch.zeros(1, S, S, C + 5 * B)
    pred[..., :C] = target[..., :C]
    obj = target[..., C] > 0
    xywh = target[..., C + 1 : C + 5]
    pred[..., C] = target[..., C]  # predictor 0: confidence 1 = its IoU
    pred[..., C + 1 : C + 3] = xywh[..., :2]
    pred[..., C + 3 : C + 5] = xywh[..., 2:].sqrt()
    terms = YOLOv1Loss(S, B, C).terms(pred, target)
    assert terms["coord"].item() == pytest.approx(0.0, abs=1e-10)
    assert terms["class"].item() == pytest.approx(0.0, abs=1e-10)
    assert terms["object"].item() == pytest.approx(0.0, abs=1e-10)
    assert terms["noobj"].item() == 0.0
    assert obj.sum() == 2


def test_second_predictor_of_an_object_cell_gets_the_noobj_term():
    S, B, C = 1, 2, 1
    target = encode_targets(torch.tensor([[0.25, 0.25, 0.75, 0.75]]), torch.tensor([0]), S, C)[None]
    pred = torch.zeros(1, S, S, C + 5 * B)
    pred[..., C : C + 5] = torch.tensor([1.0, 0.5, 0.5, 0.5**0.5, 0.5**0.5])  # exact box
    pred[..., C + 5] = 0.8  # the other predictor's confidence
    terms = YOLOv1Loss(S, B, C).terms(pred, target)
    assert terms["noobj"].item() == pytest.approx(0.5 * 0.8**2)


def test_confidence_target_is_the_detached_iou():
    S, B, C = 1, 1, 1
    target = encode_targets(torch.tensor([[0.0, 0.0, 1.0, 0.5]]), torch.tensor([0]), S, C)[None]
    pred = torch.zeros(1, S, S, C + 5 * B, requires_grad=True)
    with torch.no_grad():
        # Predicted box: centre (0.5, 0.25), size 1 x 0.25 -> IoU with (1 x 0.5) is 0.5.
        pred[..., C:] = torch.tensor([0.0, 0.5, 0.25, 1.0, 0.5])
    terms = YOLOv1Loss(S, B, C).terms(pred, target)
    assert terms["object"].item() == pytest.approx(0.25)  # (0 - 0.5)^2
    terms["object"].backward()
    grad = pred.grad[0, 0, 0]
    assert grad[C].item() == pytest.approx(-1.0)  # d/dconf (conf - 0.5)^2 at 0
    assert torch.all(grad[C + 1 :] == 0), "no gradient may flow through the IoU target"


def test_divided_by_batch_size():
    pred, target = random_batch(0, N=2)
    loss = YOLOv1Loss(4, 2, 5)
    doubled = loss(torch.cat((pred, pred)), torch.cat((target, target)))
    torch.testing.assert_close(doubled, loss(pred, target))


def test_shape_errors_name_the_shape():
    with pytest.raises(ValueError, match="pred must be"):
        YOLOv1Loss(7, 2, 20)(torch.zeros(1, 7, 7, 29), torch.zeros(1, 7, 7, 25))
