import pytest
import torch

from model import decode_predictions, encode_targets
from model.boxes import decode_targets, paired_box_iou


def random_boxes_one_per_cell(S: int, generator: torch.Generator) -> torch.Tensor:
    """Boxes whose centres lie in distinct cells (about half the cells), xyxy normalised."""
    cells = torch.randperm(S * S, generator=generator)[: S * S // 2]
    i, j = cells // S, cells % S
    offset = torch.rand(len(cells), 2, generator=generator) * 0.98 + 0.01
    cx, cy = (j + offset[:, 0]) / S, (i + offset[:, 1]) / S
    wh = torch.rand(len(cells), 2, generator=generator) * 0.5 + 0.01
    boxes = torch.stack(
        (cx - wh[:, 0] / 2, cy - wh[:, 1] / 2, cx + wh[:, 0] / 2, cy + wh[:, 1] / 2)
    )
    return boxes.T.contiguous()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("S", [7, 4])
def test_encode_decode_round_trip(seed, S):
    g = torch.Generator().manual_seed(seed)
    C = 20
    boxes = random_boxes_one_per_cell(S, g)
    labels = torch.randint(0, C, (len(boxes),), generator=g)
    target = encode_targets(boxes, labels, S, C)
    assert target.shape == (S, S, C + 5)
    decoded = decode_targets(target.unsqueeze(0), C)[0]
    # decode_targets returns row-major cell order; sort the inputs the same way.
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    order = torch.argsort((centre[:, 1] * S).floor() * S + (centre[:, 0] * S).floor())
    torch.testing.assert_close(decoded["boxes"], boxes[order], rtol=0, atol=1e-5)
    torch.testing.assert_close(decoded["labels"], labels[order])


def test_encode_hand_worked_example():
    # A box centred at (0.5, 0.25) with size 0.2 x 0.1 on a 7x7 grid:
    # column j = floor(3.5) = 3, row i = floor(1.75) = 1, offsets (0.5, 0.75).
    target = encode_targets(torch.tensor([[0.4, 0.2, 0.6, 0.3]]), torch.tensor([2]), 7, 3)
    cell = target[1, 3]
    torch.testing.assert_close(cell, torch.tensor([0, 0, 1, 1, 0.5, 0.75, 0.2, 0.1]))
    assert target.sum() == pytest.approx(cell.sum().item())


def test_encode_soft_targets_hand_worked_example():
    # The same box with a teacher's class distribution (0.7, 0.1, 0.2) and objectness 0.6.
    box, label = torch.tensor([[0.4, 0.2, 0.6, 0.3]]), torch.tensor([0])
    probs, objectness = torch.tensor([[0.7, 0.1, 0.2]]), torch.tensor([0.6])
    target = encode_targets(box, label, 7, 3, probs, objectness)
    expected = torch.tensor([0.7, 0.1, 0.2, 0.6, 0.5, 0.75, 0.2, 0.1])
    torch.testing.assert_close(target[1, 3], expected)
    assert target.sum() == pytest.approx(target[1, 3].sum().item())
    one_hot = encode_targets(box, label, 7, 3, torch.tensor([[1.0, 0, 0]]), torch.tensor([1.0]))
    torch.testing.assert_close(one_hot, encode_targets(box, label, 7, 3))  # hard is the default
    with pytest.raises(ValueError, match="both or neither"):
        encode_targets(box, label, 7, 3, probs)
    with pytest.raises(ValueError, match=r"class_probs must be \(1, 3\)"):
        encode_targets(box, label, 7, 3, probs[:, :2], objectness)


def test_larger_box_wins_a_shared_cell():
    small = [0.45, 0.45, 0.55, 0.55]
    large = [0.3, 0.3, 0.7, 0.7]
    for order in ([small, large], [large, small]):
        labels = torch.tensor([0, 1]) if order[0] == small else torch.tensor([1, 0])
        target = encode_targets(torch.tensor(order), labels, 7, 2)
        cell = target[3, 3]
        assert cell[1] == 1 and cell[0] == 0  # label of the large box
        torch.testing.assert_close(cell[5:], torch.tensor([0.4, 0.4]))


def test_centre_on_far_edge_is_clamped_into_the_last_cell():
    target = encode_targets(torch.tensor([[0.9, 0.9, 1.1, 1.1]]), torch.tensor([0]), 7, 1)
    assert target[6, 6, 1] == 1


def test_encode_empty_and_bad_labels():
    target = encode_targets(torch.empty((0, 4)), torch.empty((0,), dtype=torch.long), 7, 20)
    assert target.shape == (7, 7, 25) and target.sum() == 0
    with pytest.raises(ValueError, match="labels"):
        encode_targets(torch.tensor([[0.1, 0.1, 0.2, 0.2]]), torch.tensor([20]), 7, 20)


def test_decode_predictions_squares_sqrt_sizes_and_uses_row_i_for_y():
    S, B, C = 7, 2, 20
    pred = torch.zeros(1, S, S, C + 5 * B)
    # Cell row i=2 (y), column j=5 (x); second predictor: centre offset (0.5, 0.5), sqrt_w=0.4.
    pred[0, 2, 5, C + 5 : C + 10] = torch.tensor([0.9, 0.5, 0.5, 0.4, 0.2])
    boxes, conf = decode_predictions(pred, B, C)
    cx, cy, w, h = 5.5 / 7, 2.5 / 7, 0.16, 0.04
    expected = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    torch.testing.assert_close(boxes[0, 2, 5, 1], expected)
    assert conf[0, 2, 5, 1] == pytest.approx(0.9)


def test_paired_iou_matches_torchvision():
    from torchvision.ops import box_iou

    g = torch.Generator().manual_seed(0)
    a = torch.rand(10, 2, generator=g)
    b = torch.rand(10, 2, generator=g)
    boxes1 = torch.cat((a, a + torch.rand(10, 2, generator=g)), 1)
    boxes2 = torch.cat((b, b + torch.rand(10, 2, generator=g)), 1)
    torch.testing.assert_close(paired_box_iou(boxes1, boxes2), box_iou(boxes1, boxes2).diagonal())
    degenerate = torch.zeros(1, 4)
    assert paired_box_iou(degenerate, degenerate).item() == 0
