import pytest
import torch
from torchvision.ops import box_iou

from model import postprocess


def naive_postprocess(pred, B, C, conf_threshold, iou_threshold, max_detections):
    """Loops over cells, boxes and classes; greedy NMS per class written out by hand."""
    N, S = pred.shape[:2]
    out = []
    for n in range(N):
        candidates = []  # (score, label, box)
        for i in range(S):
            for j in range(S):
                cell = pred[n, i, j]
                for b in range(B):
                    conf, x, y, sw, sh = cell[C + 5 * b : C + 5 * b + 5].tolist()
                    cx, cy, w, h = (j + x) / S, (i + y) / S, sw * sw, sh * sh
                    box = [
                        min(max(v, 0.0), 1.0)
                        for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                    ]
                    for c in range(C):
                        score = max(conf, 0.0) * max(cell[c].item(), 0.0)
                        if score > conf_threshold:
                            candidates.append((score, c, box))
        candidates.sort(key=lambda t: -t[0])
        kept = []
        for score, c, box in candidates:
            same = [k for k in kept if k[1] == c]
            if all(
                box_iou(torch.tensor([box]), torch.tensor([k[2]])).item() <= iou_threshold
                for k in same
            ):
                kept.append((score, c, box))
        kept = kept[:max_detections]
        out.append(
            {
                "boxes": torch.tensor([k[2] for k in kept]).reshape(-1, 4),
                "scores": torch.tensor([k[0] for k in kept]),
                "labels": torch.tensor([k[1] for k in kept], dtype=torch.int64),
            }
        )
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("conf", "iou"), [(0.2, 0.5), (0.4, 0.3), (0.1, 0.7)])
def test_matches_naive_reference(seed, conf, iou):
    g = torch.Generator().manual_seed(seed)
    S, B, C = 4, 2, 3
    pred = torch.rand(2, S, S, C + 5 * B, generator=g)
    pred[..., :C] -= 0.2  # some negative class scores
    got = postprocess(pred, B, C, conf, iou, max_detections=50)
    expected = naive_postprocess(pred, B, C, conf, iou, 50)
    for g_, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g_["scores"], e["scores"])
        torch.testing.assert_close(g_["labels"], e["labels"])
        torch.testing.assert_close(g_["boxes"], e["boxes"])


def one_box_pred(S=7, B=2, C=20):
    return torch.zeros(1, S, S, C + 5 * B)


def test_overlapping_boxes_of_different_classes_both_survive():
    B, C = 2, 20
    pred = one_box_pred()
    # Two predictors in one cell, nearly the same box, classes dog (11) and cat (7).
    pred[0, 3, 3, C : C + 5] = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.5])
    pred[0, 3, 3, C + 5 : C + 10] = torch.tensor([0.8, 0.52, 0.5, 0.5, 0.5])
    pred[0, 3, 3, 11] = 1.0
    pred[0, 3, 3, 7] = 0.9
    det = postprocess(pred, B, C, conf_threshold=0.5, iou_threshold=0.5)[0]
    # Per class, NMS keeps the higher-confidence predictor; both classes survive.
    assert sorted(det["labels"].tolist()) == [7, 11]
    torch.testing.assert_close(det["scores"], torch.tensor([0.9, 0.81]))


def test_a_box_may_yield_several_classes_and_negatives_do_not_multiply():
    B, C = 2, 20
    pred = one_box_pred()
    pred[0, 0, 0, C : C + 5] = torch.tensor([0.8, 0.5, 0.5, 0.3, 0.3])
    pred[0, 0, 0, [1, 2]] = torch.tensor([0.9, 0.5])
    pred[0, 5, 5, C : C + 5] = torch.tensor([-0.9, 0.5, 0.5, 0.3, 0.3])
    pred[0, 5, 5, 4] = -0.9  # (-0.9) * (-0.9) would be 0.81 without clamping
    det = postprocess(pred, B, C, conf_threshold=0.3)[0]
    assert det["labels"].tolist() == [1, 2]
    assert det["boxes"].shape == (2, 4)


def test_boxes_are_clipped_and_sorted_and_capped():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(1, 7, 7, 30, generator=g) * 2
    det = postprocess(pred, 2, 20, conf_threshold=0.0, iou_threshold=1.0, max_detections=10)[0]
    assert len(det["scores"]) == 10
    assert det["boxes"].min() >= 0 and det["boxes"].max() <= 1
    assert torch.all(det["scores"][:-1] >= det["scores"][1:])


def test_empty_in_typed_empty_out():
    out = postprocess(torch.zeros(2, 7, 7, 30), 2, 20)
    assert len(out) == 2
    assert out[0]["boxes"].shape == (0, 4) and out[0]["boxes"].dtype == torch.float32
    assert out[0]["labels"].dtype == torch.int64
    assert postprocess(torch.zeros(0, 7, 7, 30), 2, 20) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"conf_threshold": 1.5}, "conf_threshold"), ({"iou_threshold": -0.1}, "iou_threshold"),
     ({"max_detections": 0}, "max_detections")],
)  # fmt: skip
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        postprocess(torch.zeros(1, 7, 7, 30), 2, 20, **kwargs)
