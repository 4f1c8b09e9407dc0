"""yolov1-train and yolov1-eval end to end on tiny synthetic data, plus the learning proof."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import (
    SHARED,
    make_mirrored_voc,
    make_voc,
    unmirror_by_hand,
    write_darknet_weights,
    write_image,
)

from model import YOLOv1Loss, load_checkpoint
from model.data import read_voc
from model.evaluate import cli as eval_cli
from model.train import (
    Trainer,
    TrainingError,
    ema_average,
    get_args_parser,
    lr_factor,
    main,
    output_paths,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_voc(tmp_path: Path) -> Path:
    """Six 128x128 images with one or two white squares labelled cat/dog, in train and val."""
    items = {}
    for k in range(6):
        x = 10 + 15 * k
        objects = [("cat", x + 1, 20, x + 40, 60, 0)]
        if k % 2:
            objects.append(("dog", 70, 70, 120, 120, 0))
        items[f"img{k}"] = (128, 128, objects)
    root = make_voc(tmp_path / "voc", items)
    for image_id, (_, _, objects) in items.items():
        boxes = [(x1 - 1, y1 - 1, x2, y2) for _, x1, y1, x2, y2, _ in objects]
        write_image(root / "JPEGImages" / f"{image_id}.png", 128, 128, boxes)
    (root / "ImageSets" / "Main" / "val.txt").write_text("img0\nimg1\n")
    return root


def train_args(data: Path, out: Path, *extra: str):
    return get_args_parser().parse_args(
        ["--data", str(data), "--arch", "yolov1-tiny", "--img-size", "128", "--epochs", "2",
         "--batch-size", "4", "--optimizer", "adamw", "--lr", "1e-3", "--workers", "0",
         "--no-progress", "--out", str(out), *extra]
    )  # fmt: skip


def test_lr_schedule_follows_the_paper():
    steps, epochs = 10, 135
    assert lr_factor(0, steps, epochs, 1, "step") == pytest.approx(0.1)  # 1e-3 of 1e-2
    assert lr_factor(10, steps, epochs, 1, "step") == 1.0
    assert lr_factor(74 * steps, steps, epochs, 1, "step") == 1.0
    assert lr_factor(76 * steps, steps, epochs, 1, "step") == pytest.approx(0.1)
    assert lr_factor(106 * steps, steps, epochs, 1, "step") == pytest.approx(0.01)
    assert lr_factor(epochs * steps, steps, epochs, 1, "cosine") == pytest.approx(0.01)


def test_train_writes_servable_best_last_state_and_log(toy_voc, tmp_path):
    out = tmp_path / "run" / "w.safetensors"
    best = main(train_args(toy_voc, out))
    paths = output_paths(out)
    assert best == out
    for key in ("best", "last", "state", "csv"):
        assert paths[key].is_file(), key
    model, meta = load_checkpoint(best)
    assert meta["arch"] == "yolov1-tiny" and meta["image_size"] == 128
    assert meta["training"]["epochs_done"] >= 1
    assert meta["training"]["val_map50_11point"] is not None
    assert len(paths["csv"].read_text().splitlines()) == 3  # header + 2 epochs
    # The class log: each epoch's per-class AP, whose mean over the classes val holds is the
    # main log's mAP.
    with open(paths["class_csv"]) as f:
        class_rows = list(csv.DictReader(f))
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert list(class_rows[0]) == ["epoch", *meta["class_names"]]
    assert [r["epoch"] for r in class_rows] == [r["epoch"] for r in rows] == ["1", "2"]
    for class_row, row in zip(class_rows, rows, strict=True):
        aps = [float(v) for k, v in class_row.items() if k != "epoch" and v != ""]
        assert 0 < len(aps) < len(meta["class_names"])  # toy val lacks some classes
        assert sum(aps) / len(aps) == pytest.approx(float(row["val_map50"]), abs=2e-4)
    # The servable file holds only model tensors: no optimizer state.
    assert best.stat().st_size < paths["state"].stat().st_size


def test_resume_continues_from_the_saved_epoch(toy_voc, tmp_path):
    out = tmp_path / "w.safetensors"
    main(train_args(toy_voc, out, "--epochs", "1"))
    state = torch.load(output_paths(out)["state"], weights_only=True)
    assert int(state["epoch"]) == 0
    main(train_args(toy_voc, out, "--epochs", "2", "--resume"))
    state = torch.load(output_paths(out)["state"], weights_only=True)
    assert int(state["epoch"]) == 1
    assert len(output_paths(out)["csv"].read_text().splitlines()) == 3


def test_ema_average_matches_a_hand_computed_moving_average():
    from torch.optim.swa_utils import AveragedModel

    net = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    ema = AveragedModel(net, multi_avg_fn=ema_average(0.2), use_buffers=True)
    expected = None
    for k in range(4):
        with torch.no_grad():
            net[0].weight.fill_(float(k + 1))
        net[1].num_batches_tracked.fill_(10 * k)
        ema.update_parameters(net)
        # The first update copies; then the decay is min(0.2, (1 + n) / (10 + n)) after n
        # updates: 2/11, then 0.2 (3/12 and 4/13 are above it).
        decay = [None, 2 / 11, 0.2, 0.2][k]
        expected = 1.0 if decay is None else decay * expected + (1 - decay) * (k + 1)
        torch.testing.assert_close(ema.module[0].weight, torch.full((1, 2), expected))
        assert int(ema.module[1].num_batches_tracked) == 10 * k  # an integer: copied
    # By hand: 1 -> 2/11 + 18/11 = 1.8182 -> 0.36364 + 2.4 = 2.7636 -> 0.55273 + 3.2 = 3.7527.
    assert expected == pytest.approx(3.7527, abs=1e-4)


def test_ema_is_what_is_evaluated_saved_and_resumed(toy_voc, tmp_path):
    out = tmp_path / "w.safetensors"
    main(train_args(toy_voc, out, "--epochs", "1", "--ema", "0.9", "--batch-size", "1"))
    state = torch.load(output_paths(out)["state"], weights_only=True)
    model, meta = load_checkpoint(output_paths(out)["last"])
    assert meta["training"]["ema"] == 0.9 and int(state["ema"]["n_averaged"]) == 6  # 6 images
    name = "darknet.0.conv.weight"
    saved = model.state_dict()[name]
    torch.testing.assert_close(saved, state["ema"][f"module.{name}"])
    assert not torch.allclose(saved, state["model"][name])  # the average, not the last step
    main(train_args(toy_voc, out, "--epochs", "2", "--ema", "0.9", "--batch-size", "1", "--resume"))
    state = torch.load(output_paths(out)["state"], weights_only=True)
    assert int(state["ema"]["n_averaged"]) == 12
    with pytest.raises(ValueError, match="--ema"):
        main(train_args(toy_voc, tmp_path / "x.safetensors", "--ema", "1.0"))


def test_init_from_checkpoint_with_other_classes(toy_voc, tmp_path):
    first = tmp_path / "a.safetensors"
    main(train_args(toy_voc, first, "--epochs", "1"))
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    second = tmp_path / "b.safetensors"
    main(train_args(toy_voc, second, "--epochs", "1", "--max-steps", "1", "--init", str(first),
                    "--class-names", str(names)))  # fmt: skip
    a, _ = load_checkpoint(first)
    b, meta = load_checkpoint(second)
    assert meta["class_names"] == ["cat", "dog"]
    # The first conv came from the first run (then one step of training moved it a little).
    w_a, w_b = a.darknet[0].conv.weight, b.darknet[0].conv.weight
    assert torch.nn.functional.cosine_similarity(w_a.flatten(), w_b.flatten(), dim=0) > 0.99


def test_non_finite_loss_stops_without_writing_weights(toy_voc, tmp_path, monkeypatch):
    def nan_terms(self, pred, target):
        return {"coord": pred.sum() * float("nan")}

    monkeypatch.setattr(YOLOv1Loss, "terms", nan_terms)
    out = tmp_path / "w.safetensors"
    with pytest.raises(TrainingError, match="non-finite"):
        main(train_args(toy_voc, out))
    assert not out.exists() and not output_paths(out)["last"].exists()


def test_ctrl_c_saves_last_and_state(toy_voc, tmp_path, monkeypatch):
    from model import train as train_module

    calls = {"n": 0}
    original = train_module.Trainer.train_epoch

    def interrupted(self, epoch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(train_module.Trainer, "train_epoch", interrupted)
    out = tmp_path / "w.safetensors"
    with pytest.raises(KeyboardInterrupt):
        main(train_args(toy_voc, out))
    assert output_paths(out)["last"].is_file() and output_paths(out)["state"].is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "/nonexistent/voc"], "nonexistent"),
        (["--data", "{voc}", "--img-size", "100"], "img_size|image_size"),
        (["--data", "{voc}", "--resume"], "no training state"),
    ],
)
def test_cli_errors_are_one_line_without_traceback(toy_voc, tmp_path, argv, message):
    argv = [a.replace("{voc}", str(toy_voc)) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "model.train", *argv, "--out", str(tmp_path / "w.safetensors"),
         "--workers", "0", "--arch", "yolov1-tiny"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    import re

    assert re.search(message, error_lines[0])


def test_eval_cli_prints_table_and_writes_json(toy_voc, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    main(train_args(toy_voc, out, "--epochs", "1"))
    report = tmp_path / "eval.json"
    eval_cli(["--weights", str(out), "--data", str(toy_voc), "--split", "val",
              "--json", str(report), "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "mAP@0.5" in printed and "images/s" in printed and "cat" in printed
    import json

    result = json.loads(report.read_text())
    assert set(result) >= {"map50_11point", "map50_all", "map_coco", "ap50_11point"}
    assert len(result["ap50_all"]) == 20


def test_eval_cli_bad_weights_is_one_line(tmp_path, toy_voc):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not safetensors")
    proc = subprocess.run(
        [sys.executable, "-m", "model.evaluate", "--weights", str(bad), "--data", str(toy_voc)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "bad.safetensors" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_hold_identical_weights(toy_voc, tmp_path):
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "ddp_worker.py"),
         str(toy_voc), str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    initial = torch.load(tmp_path / "rank0-initial.pt", weights_only=True)
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
    moved = any(not torch.equal(initial[k], ranks[0][k]) for k in initial)
    assert moved, "the ranks must have trained, not just agreed on the initial weights"


def pick_sparse_images(root: Path, count: int, max_objects: int) -> list[str]:
    """The first ``count`` train images with at most ``max_objects`` objects, none difficult."""
    chosen = []
    for ann in read_voc(root, "train"):
        if len(ann.labels) <= max_objects and not ann.difficult.any():
            chosen.append(ann.image_path.stem)
        if len(chosen) == count:
            return chosen
    raise AssertionError("not enough sparse images")


@pytest.mark.slow
@pytest.mark.shared
def test_tiny_model_learns_eight_real_images(tmp_path):
    """Targets, loss and decoding fit together: 8 real VOC images are learnt to mAP >= 0.9."""
    source = SHARED / "datasets" / "voc2007_subset"
    if not source.is_dir():
        pytest.skip(f"shared data set not present at {source}")
    root = tmp_path / "voc8"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "JPEGImages").symlink_to(source / "JPEGImages")
    (root / "Annotations").symlink_to(source / "Annotations")
    ids = pick_sparse_images(source, 8, max_objects=3)
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids) + "\n")
    args = get_args_parser().parse_args(
        ["--data", str(root), "--val-split", "train", "--arch", "yolov1-tiny", "--img-size", "256",
         "--epochs", "60", "--batch-size", "8", "--optimizer", "adamw", "--lr", "1e-3",
         "--weight-decay", "0", "--schedule", "cosine", "--warmup-epochs", "5",
         "--eval-every", "20", "--no-augment", "--workers", "0", "--no-progress",
         "--out", str(tmp_path / "w.safetensors")]
    )  # fmt: skip
    best = main(args)
    _, meta = load_checkpoint(best)
    assert meta["training"]["val_map50_11point"] >= 0.9


def test_shared_cell_epochs_train_a_convolution_then_the_connected_layer(toy_voc, tmp_path):
    # A one-scale Darknet backbone, stride 32: a 4 x 4 map of 128 px, the head conv straight
    # into the connected output layer (--head-hidden 0).
    conv = (
        "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=2\npad=1\nactivation=leaky\n"
    )
    cfg = tmp_path / "b.cfg"
    cfg.write_text(
        "[net]\nwidth=128\nheight=128\nchannels=3\n"
        + (conv + "[maxpool]\nsize=2\nstride=2\n") * 2
        + conv
    )
    weights = write_darknet_weights(
        tmp_path / "b.weights", [(3, 8, 3, True), (8, 8, 3, True), (8, 8, 3, True)]
    )
    out = tmp_path / "w.safetensors"
    argv = ["--backbone", str(cfg), str(weights), "--backbone-layer", "4", "--head-hidden", "0",
            "--head-filters", "6", "--epochs", "2", "--shared-cell-epochs", "1"]  # fmt: skip
    main(train_args(toy_voc, out, *argv, "--max-steps", "1"))  # the first epoch: one step
    model, meta = load_checkpoint(output_paths(out)["last"])
    assert meta["training"]["shared_cell_epochs"] == 1
    S, D = model.grid_size, 30
    linear = model.fcs[-1]
    features = model.darknet(model.stem(torch.rand(2, 3, 128, 128)))  # (2, 6, S, S)
    with torch.no_grad():
        block, bias = linear.weight[:D, :: S * S], linear.bias[:D]
        reference = torch.nn.functional.conv2d(features, block[:, :, None, None], bias)
        torch.testing.assert_close(
            linear(features.flatten(1)).view(2, S, S, D), reference.permute(0, 2, 3, 1)
        )
    # --init from that file keeps its trained layer (the mean of its cells' blocks: itself);
    # only a layer nothing initialised gets a fresh block.
    init = train_args(
        toy_voc, tmp_path / "i.safetensors", *argv, "--init", str(output_paths(out)["last"])
    )
    torch.testing.assert_close(Trainer(init).model.fcs[-1].weight, linear.weight)
    fresh = Trainer(train_args(toy_voc, tmp_path / "f.safetensors", *argv)).model.fcs[-1].weight
    assert not torch.allclose(fresh, linear.weight)
    main(train_args(toy_voc, out, *argv, "--resume"))  # the second epoch: the whole layer
    model, _ = load_checkpoint(output_paths(out)["last"])
    weight = model.fcs[-1].weight.view(S * S, D, 6, S * S)
    assert weight[0, :, :, 1].abs().max() > 0  # cell (0, 0) now reads cell (0, 1) too
    with pytest.raises(ValueError, match="--head-hidden 0"):
        main(train_args(toy_voc, tmp_path / "x.safetensors", "--shared-cell-epochs", "1"))


def test_eval_mirror_is_the_mirrored_files_detections_mapped_back(weights, tmp_path):
    from model.data import read_datasets
    from model.evaluate import predict

    plain, mirrored = make_mirrored_voc(tmp_path, [(96, 70), (150, 110), (64, 64)])
    model, meta = load_checkpoint(weights)
    cpu = torch.device("cpu")
    on_plain = read_datasets([plain], "voc", "val", meta["class_names"])
    every = {"conf_threshold": 0.0}  # a random network: keep every candidate
    got = predict(model, on_plain, cpu, mirror=True, **every)
    ref = predict(model, read_datasets([mirrored], "voc", "val", meta["class_names"]), cpu, **every)
    assert sum(len(d["scores"]) for d in got) > 10  # a random network: plenty to compare
    for g, r, ann in zip(got, ref, on_plain, strict=True):
        torch.testing.assert_close(g["scores"], r["scores"])
        assert torch.equal(g["labels"], r["labels"])
        torch.testing.assert_close(g["boxes"], unmirror_by_hand(r["boxes"], ann.width))
    # and the mirror is not the plain image: a random network is not symmetric
    assert not torch.equal(predict(model, on_plain, cpu, **every)[0]["scores"], got[0]["scores"])


def test_eval_refuses_to_calibrate_on_mirrored_images(weights, tmp_path):
    from model.evaluate import get_args_parser as eval_parser
    from model.evaluate import main as eval_main

    plain, _ = make_mirrored_voc(tmp_path, [(96, 70)])
    before = weights.read_bytes()
    args = ["--weights", str(weights), "--data", str(plain), "--calibrate", "--mirror"]
    with pytest.raises(ValueError, match="without --mirror"):
        eval_main(eval_parser().parse_args(args))
    assert weights.read_bytes() == before
