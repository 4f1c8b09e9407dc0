"""Dense distillation (--distill-dense): the teacher's class scores per student cell."""

from __future__ import annotations

import csv

import pytest
import torch
from builders import SHARED, make_dog_voc, write_tiny_yolo

from model.boxes import box_cells
from model.checkpoint import load_checkpoint
from model.config import VOC_CLASSES
from model.darknet import decode_yolo, load_darknet
from model.distill import (
    DenseTeacher,
    boxed_targets,
    cell_class_targets,
    mix_dense,
    reachable_output,
    same_prefix,
)
from model.loss import YOLOv1Loss
from model.train import cli, get_args_parser, main, output_paths


def test_cell_targets_by_hand():
    # S = 2. Cell (0, 0) holds two predictions, (0, 1) one, (1, 1) one on the far corner
    # (x = y = 1.0 belongs to the last cell), (1, 0) none.
    centres = torch.tensor([[[0.1, 0.1], [0.4, 0.3], [0.9, 0.2], [1.0, 1.0]]])
    objectness = torch.tensor([[0.5, 0.25, 0.8, 0.1]])
    probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.6]]])
    q, w = cell_class_targets(centres, objectness, probs, 2)
    expected_q = torch.tensor([[[[2 / 3, 1 / 3], [0.5, 0.5]], [[0.0, 0.0], [0.2, 0.6]]]])
    torch.testing.assert_close(q, expected_q)
    torch.testing.assert_close(w, torch.tensor([[[0.5, 0.8], [0.0, 0.1]]]))


def slow_reference(network, image, S, teacher_to_student, C):
    """Every prediction of the whole network on the image, one at a time, into cells."""
    with torch.no_grad():
        boxes, obj, probs = decode_yolo(network, network(image))
    q = torch.zeros(S, S, C)
    mass = torch.zeros(S, S)
    w = torch.zeros(S, S)
    for m in range(boxes.shape[1]):
        x = (boxes[0, m, 0] + boxes[0, m, 2]).item() / 2
        y = (boxes[0, m, 1] + boxes[0, m, 3]).item() / 2
        row, col = min(int(y * S), S - 1), min(int(x * S), S - 1)
        o = float(obj[0, m])
        for t, s in enumerate(teacher_to_student):
            if s >= 0:
                q[row, col, s] += o * float(probs[0, m, t])
        mass[row, col] += o
        w[row, col] = max(w[row, col], o)
    return q / mass.clamp_min(1e-12)[..., None], w


@pytest.mark.parametrize("student", [list(reversed(VOC_CLASSES)), ["dog", "cat"]])
def test_the_dense_teacher_on_cached_features_matches_the_whole_network(tmp_path, student):
    cfg, weights = write_tiny_yolo(tmp_path)
    network = load_darknet(cfg, weights)
    image = torch.rand(1, 3, 128, 128)  # 4 x 4 predictions an anchor
    mapping = [student.index(n) if n in student else -1 for n in VOC_CLASSES]
    with torch.no_grad():
        cached = network(image, upto=2)[0]  # what --cache-views keeps with --train-from-layer 3
    teacher = DenseTeacher(network, 3, mapping, S=3)
    q, w = teacher(cached)
    ref_q, ref_w = slow_reference(network, image, 3, mapping, len(student))
    torch.testing.assert_close(q[0], ref_q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w[0], ref_w, atol=1e-6, rtol=1e-5)
    assert (w > 0).all()  # 16 centres on a 3 x 3 grid: every cell holds some


def test_reachable_output_and_same_prefix(tmp_path):
    cfg, weights = write_tiny_yolo(tmp_path)
    network = load_darknet(cfg, weights)
    assert reachable_output(network, 3) == 6
    with pytest.raises(ValueError, match="no \\[yolo\\] output"):
        reachable_output(network, 7)
    other = load_darknet(cfg, write_tiny_yolo(tmp_path / "other", seed=1)[1])
    assert same_prefix(network, load_darknet(cfg, weights), 4)
    assert not same_prefix(network, other, 0)
    # A network with fewer layers than the cut (the first three of the same weights) is not
    # that prefix, whichever side it is on.
    short = load_darknet(cfg, weights, upto=2)
    assert same_prefix(network, short, 2)
    assert not same_prefix(network, short, 4) and not same_prefix(short, network, 4)


@pytest.mark.shared
def test_yolo_fastest_xl_stride_32_output_runs_from_layer_99():
    folder = SHARED / "teachers" / "yolo-fastest-xl-voc"
    if not folder.is_dir():
        pytest.skip(f"needs {folder} (../shared)")
    network = load_darknet(folder / "yolo-fastest-xl.cfg")  # the cfg is enough: no weights
    assert reachable_output(network, 99) == 115  # the stride-32 [yolo] on layers 99..114
    with pytest.raises(ValueError):  # the stride-16 branch reads layer 81
        reachable_output(network, 117)


def test_dense_term_by_hand():
    loss = YOLOv1Loss(S=1, B=1, C=2)
    pred = torch.zeros(2, 1, 1, 7)
    pred[0, 0, 0, :2] = torch.tensor([0.5, 0.0])
    pred[1, 0, 0, :2] = torch.tensor([0.5, 0.0])
    target = torch.zeros(2, 1, 1, 7)
    target[1, 0, 0, 2] = 1.0  # the second image's cell holds an object: its class term rules
    q = torch.tensor([1.0, 0.0]).expand(2, 1, 1, 2)
    w = torch.full((2, 1, 1), 0.5)
    # (0.5 * (0.5 - 1)^2 + 0) / N = 0.125 / 2
    assert loss.dense_term(pred, target, q, w).item() == pytest.approx(0.0625)


def test_mix_dense_by_hand():
    first, side = torch.tensor(2.0), torch.tensor(4.0)
    assert mix_dense([first], 0.7).item() == 2.0  # one backbone: its term whole
    assert mix_dense([first, None], 0.7).item() == 2.0  # no teacher for the side's layers
    assert mix_dense([None, side], 0.7).item() == 4.0  # none for the first's: the side's whole
    with pytest.raises(ValueError, match="at least one"):
        mix_dense([None, None], 0.5)
    assert mix_dense([first, side], 0.7).item() == pytest.approx(0.3 * 2 + 0.7 * 4)
    assert mix_dense([first, side], 0.5).item() == pytest.approx(3.0)  # the default: the mean
    assert mix_dense([first, side], 0.0).item() == 2.0


def test_box_cells_by_hand():
    # A 4 x 4 grid: cell centres at 0.125, 0.375, 0.625, 0.875 on each axis.
    boxes = torch.tensor(
        [[0.0, 0.0, 0.5, 0.5],  # class 3: rows 0-1, columns 0-1
         [0.3, 0.3, 0.45, 0.45],  # class 5, smaller, holds the centre of cell (1, 1) only
         [0.6, 0.15, 0.7, 0.3],  # class 7: x holds 0.625, y no centre (0.125 < 0.15 < 0.3 < 0.375)
         [0.55, 0.55, 1.0, 1.0]]  # class 9: rows 2-3, columns 2-3
    )  # fmt: skip
    cells = box_cells(boxes, torch.tensor([3, 5, 7, 9]), 4)
    expected = torch.tensor([[3, 3, -1, -1], [3, 5, -1, -1], [-1, -1, 9, 9], [-1, -1, 9, 9]])
    assert torch.equal(cells, expected)
    assert torch.equal(box_cells(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2),
                       torch.full((2, 2), -1))  # fmt: skip
    with pytest.raises(ValueError, match="labels"):
        box_cells(boxes, torch.tensor([1]), 4)


def test_boxed_targets_by_hand():
    q = torch.full((1, 2, 2, 3), 1 / 3)
    w = torch.full((1, 2, 2), 0.2)
    cells = torch.tensor([[[2, -1], [-1, 0]]])
    boxed_q, boxed_w = boxed_targets(q, w, cells)
    assert boxed_q[0, 0, 0].tolist() == [0.0, 0.0, 1.0] and boxed_q[0, 1, 1].tolist() == [1, 0, 0]
    assert torch.equal(boxed_q[0, 0, 1], q[0, 0, 1]) and torch.equal(boxed_q[0, 1, 0], q[0, 1, 0])
    assert torch.equal(boxed_w, torch.tensor([[[1.0, 0.2], [0.2, 1.0]]]))
    assert boxed_targets(q, w, None) == (q, w)


def dense_args(tmp_path, voc, cfg, weights, *extra, backbone=None):
    return get_args_parser().parse_args(
        ["--data", str(voc), "--img-size", "128", "--epochs", "1", "--batch-size", "4",
         "--optimizer", "adamw", "--lr", "1e-3", "--workers", "0", "--no-progress",
         "--backbone", str(cfg), str(backbone or weights), "--backbone-layer", "4",
         "--teacher", str(cfg), str(weights), "--cache-views", "1", "--train-from-layer", "3",
         "--out", str(tmp_path / "run" / "w.safetensors"), *extra]
    )  # fmt: skip


@pytest.mark.slow
def test_train_with_dense_distillation(tmp_path):
    cfg, weights = write_tiny_yolo(tmp_path / "teacher")
    voc = make_dog_voc(tmp_path / "voc")
    best = main(dense_args(tmp_path, voc, cfg, weights, "--distill-dense", "2"))
    _, meta = load_checkpoint(best)
    assert meta["training"]["distill_dense"] == 2.0
    with open(output_paths(tmp_path / "run" / "w.safetensors")["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[0]["dense"]) > 0

    assert meta["training"]["distill_dense_boxes"] is False

    # --distill-dense-boxes: the same run with the dogs' cells taught "dog" at full weight.
    boxed = main(dense_args(tmp_path, voc, cfg, weights, "--distill-dense", "2",
                            "--distill-dense-boxes",
                            "--out", str(tmp_path / "b" / "w.safetensors")))  # fmt: skip
    assert load_checkpoint(boxed)[1]["training"]["distill_dense_boxes"] is True
    with open(output_paths(tmp_path / "b" / "w.safetensors")["csv"]) as f:
        boxed_rows = list(csv.DictReader(f))
    assert float(boxed_rows[0]["dense"]) > 0 and boxed_rows[0]["dense"] != rows[0]["dense"]
    # With mosaic views too: their cells join the plain views' (Views concatenated field-wise).
    mosaic = main(dense_args(tmp_path, voc, cfg, weights, "--distill-dense", "1",
                             "--distill-dense-boxes", "--cache-mosaic-views", "1",
                             "--out", str(tmp_path / "m" / "w.safetensors")))  # fmt: skip
    assert load_checkpoint(mosaic)[1]["training"]["cache_mosaic_views"] == 1

    # The cached layers must be the teacher's own: another backbone's weights are refused.
    other = write_tiny_yolo(tmp_path / "other", seed=1)[1]
    with pytest.raises(ValueError, match="teacher's own"):
        main(dense_args(tmp_path, voc, cfg, weights, "--distill-dense", "1", backbone=other))
    with pytest.raises(ValueError, match="needs --cache-views"):
        main(dense_args(tmp_path, voc, cfg, weights, "--distill-dense", "1", "--cache-views", "0"))


def test_dense_boxes_without_dense_distillation_is_a_clear_cli_error(tmp_path, capsys):
    cfg, weights = write_tiny_yolo(tmp_path / "teacher")
    voc = make_dog_voc(tmp_path / "voc")
    with pytest.raises(SystemExit) as exit_info:
        cli(["--data", str(voc), "--backbone", str(cfg), str(weights), "--backbone-layer", "4",
             "--teacher", str(cfg), str(weights), "--cache-views", "1",
             "--train-from-layer", "3", "--distill-dense-boxes",
             "--out", str(tmp_path / "w.safetensors")])  # fmt: skip
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "--distill-dense-boxes needs --distill-dense" in err and "Traceback" not in err
    assert not (tmp_path / "w.safetensors").exists()
