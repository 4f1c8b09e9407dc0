"""A student on two pretrained backbones side by side (``--backbone-side``): both cfgs' layers run
on the same image, their last maps concatenated along the channels into the YOLOv1 head; the
cache cuts both at one layer index. Checked against each backbone run alone through
``load_darknet``, through a checkpoint's round trip, ONNX, and training on cached features with
dense distillation from the first backbone's own head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from builders import TINY_YOLO, make_dog_voc, write_tiny_yolo

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import VOC_CLASSES, ArchConfig
from model.darknet import load_darknet
from model.data import read_voc
from model.export import export_onnx
from model.feature_cache import cache_key
from model.network import YOLOv1
from model.train import backbone_arch, cli, get_args_parser, init_from, load_backbone, main


def write_narrow(folder: Path, seed: int = 5) -> tuple[Path, Path]:
    """The tiny detector with 12 filters instead of 16 in its stride-32 conv: a side backbone
    whose map is the first's size with other channels."""
    return write_tiny_yolo(folder, seed, filters=12, name="narrow")


def two_stem_student(tmp_path: Path) -> tuple[YOLOv1, tuple[Path, Path], tuple[Path, Path]]:
    first, side = write_tiny_yolo(tmp_path / "first"), write_narrow(tmp_path / "side")
    model = YOLOv1(
        backbone_arch(first[0], 4, side=side[0]), 20, 2, 64, mean=(0, 0, 0), std=(1, 1, 1)
    )
    load_backbone(model, *first, 4, None, side)
    return model.eval(), first, side


def test_the_head_reads_both_pretrained_maps(tmp_path):
    model, first, side = two_stem_student(tmp_path)
    assert model.stem.out_channels == 16 + 12 and model.grid_size == 2
    assert model.arch_config.name == "yolov1-tiny+narrow"
    a, b = load_darknet(*first), load_darknet(*side)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        maps = torch.cat([a(x, upto=4)[0], b(x, upto=4)[0]], dim=1)  # each backbone alone
        torch.testing.assert_close(model.stem(x), maps)
        torch.testing.assert_close(model(x), model.head(maps))
        # The side's channels matter: zeroing them changes the grid.
        assert (model.head(maps) - model.head(torch.cat([maps[:, :16], 0 * maps[:, 16:]], 1))
                ).abs().max() > 1e-4  # fmt: skip


def test_cached_features_cut_both_backbones_at_one_layer(tmp_path):
    model, first, side = two_stem_student(tmp_path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = model.stem_features(x, 2)  # layer 2 of each: 8 channels, 8 x 8
        assert features.shape == (2, 16, 8, 8)
        own, other = model.stem.split(features, 2)
        torch.testing.assert_close(own, load_darknet(*first)(x, upto=2)[0])
        torch.testing.assert_close(other, load_darknet(*side)(x, upto=2)[0])
        torch.testing.assert_close(model.forward_from(features, 2), model(x))
    model.stem.check_split(3)
    with pytest.raises(ValueError, match=r"layers are 0..4"):
        model.stem.check_split(6)
    assert [len(model.stem.layers_from(k)) for k in (0, 3)] == [10, 4]


def test_a_side_map_of_another_size_is_refused(tmp_path):
    first = write_tiny_yolo(tmp_path / "first")
    wide = tmp_path / "wide.cfg"  # the last conv without its stride: a 4 x 4 map, not 2 x 2
    wide.write_text(
        TINY_YOLO.replace("filters=16\nsize=3\nstride=2", "filters=16\nsize=3\nstride=1")
    )
    with pytest.raises(ValueError, match=r"side backbone's \(4, 4\) map is not the backbone's"):
        YOLOv1(backbone_arch(first[0], 4, side=wide), 20, 2, 64)
    with pytest.raises(ValueError, match="cannot be combined"):
        backbone_arch(first[0], 4, fine_layer=5, side=wide)
    short = tmp_path / "short.cfg"  # the detector's first layer only
    short.write_text(TINY_YOLO[: TINY_YOLO.index("[maxpool]")])
    with pytest.raises(ValueError, match=r"--backbone-layer 4: .*short.cfg has layers 0..0"):
        backbone_arch(first[0], 4, side=short)


def test_the_architecture_round_trips_and_one_backbone_files_keep_their_fields(tmp_path):
    model, first, _ = two_stem_student(tmp_path)
    path = save_checkpoint(tmp_path / "two.safetensors", model, {"class_names": list(VOC_CLASSES)})
    loaded, meta = load_checkpoint(path)
    assert meta["architecture"]["darknet_side_cfg"].startswith("[net]")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))
    one = backbone_arch(first[0], 4)
    assert "darknet_side_cfg" not in one.to_dict()
    assert ArchConfig.from_dict(one.to_dict()) == one
    broken = {**model.arch_config.to_dict(), "darknet_cfg": None}
    with pytest.raises(ValueError, match="beside darknet_cfg, which is not set"):
        ArchConfig.from_dict(broken)


def test_onnx_export_of_the_two_backbone_student_matches_pytorch(tmp_path):
    model, _, _ = two_stem_student(tmp_path)
    onnx_path = export_onnx(model, tmp_path / "two.onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 64, 64)
    grid, *_ = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(grid, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_the_feature_cache_key_follows_the_side_weights(tmp_path):
    model, first, side = two_stem_student(tmp_path)
    annotations = read_voc(make_dog_voc(tmp_path / "voc"), "train", list(VOC_CLASSES))
    key = cache_key(model, annotations, 2, 2, 0)
    other = YOLOv1(model.arch_config, 20, 2, 64, mean=(0, 0, 0), std=(1, 1, 1))
    load_backbone(other, *first, 4, None, (side[0], write_narrow(tmp_path / "s2", seed=9)[1]))
    alone = YOLOv1(backbone_arch(first[0], 4), 20, 2, 64, mean=(0, 0, 0), std=(1, 1, 1))
    load_backbone(alone, *first, 4, None)
    keys = {key, cache_key(other, annotations, 2, 2, 0), cache_key(alone, annotations, 2, 2, 0)}
    assert len(keys) == 3


@pytest.mark.slow
@pytest.mark.parametrize("side_teacher", [False, True])
def test_train_on_two_backbones_with_dense_distillation_and_reload(tmp_path, side_teacher):
    """The first --teacher's head gives the first backbone's dense target; a teacher whose
    layers the side's are gives the side's, mixed by --distill-dense-side."""
    first, side = write_tiny_yolo(tmp_path / "first"), write_narrow(tmp_path / "side")
    extra = ["--teacher", *map(str, side), "--distill-dense-side", "0.7"] if side_teacher else []
    voc = make_dog_voc(tmp_path / "voc")
    out = tmp_path / "run" / "w.safetensors"
    args = get_args_parser().parse_args(
        ["--data", str(voc), "--img-size", "64", "--epochs", "1", "--batch-size", "4",
         "--optimizer", "adamw", "--lr", "1e-3", "--workers", "0", "--no-progress",
         "--backbone", *map(str, first), "--backbone-layer", "4",
         "--backbone-side", *map(str, side), "--teacher", *map(str, first),
         "--cache-views", "2", "--train-from-layer", "3", "--distill-dense", "1",
         "--out", str(out), *extra]
    )  # fmt: skip
    model, meta = load_checkpoint(main(args))
    assert meta["architecture"]["darknet_side_cfg"].startswith("[net]")
    assert meta["training"]["distill_dense"] == 1.0
    names = ["tiny.cfg", "narrow.cfg" if side_teacher else None]
    assert meta["training"]["distill_dense_teachers"] == names
    assert meta["training"]["distill_dense_side"] == (0.7 if side_teacher else None)
    # The cached (frozen) layers 0..2 of each backbone are still the pretrained ones.
    a, b = load_darknet(*first), load_darknet(*side)
    for k in (0, 2):
        torch.testing.assert_close(model.stem.net.layers[k].conv.weight, a.layers[k].conv.weight)
        torch.testing.assert_close(model.stem.side.layers[k].conv.weight, b.layers[k].conv.weight)
    assert len(list((out.parent / "features").glob("features-*.safetensors"))) == 1
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2, 2, 30)


def test_init_from_one_backbone_starts_the_pair_as_that_checkpoint(tmp_path):
    """--init from a student on the first backbone alone: the head conv's inputs from the side
    start at zero, so the pair computes the checkpoint's grid until training moves them."""
    model, first, side = two_stem_student(tmp_path)
    alone = YOLOv1(backbone_arch(first[0], 4), 20, 2, 64, mean=(0, 0, 0), std=(1, 1, 1))
    load_backbone(alone, *first, 4, None)
    with torch.no_grad():  # a trained head, not the fresh one both would share by seed
        for p in [*alone.darknet.parameters(), *alone.fcs.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    path = save_checkpoint(
        tmp_path / "alone.safetensors", alone.eval(), {"class_names": list(VOC_CLASSES)}
    )
    init_from(model, path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), alone(x))


@pytest.mark.slow
def test_dense_distillation_from_the_side_backbone_teacher_alone(tmp_path):
    """A first backbone whose layers no teacher has (as after --init from a fine-tuned
    checkpoint): the dense term comes from the side's own teacher alone."""
    first, side = write_tiny_yolo(tmp_path / "first", seed=3), write_narrow(tmp_path / "side")
    voc = make_dog_voc(tmp_path / "voc")
    out = tmp_path / "run" / "w.safetensors"
    common = ["--data", str(voc), "--img-size", "64", "--epochs", "1", "--batch-size", "4",
              "--optimizer", "adamw", "--lr", "1e-3", "--workers", "0", "--no-progress",
              "--backbone", *map(str, first), "--backbone-layer", "4",
              "--cache-views", "1", "--train-from-layer", "3", "--distill-dense", "1",
              "--out", str(out)]  # fmt: skip
    teacher = write_tiny_yolo(tmp_path / "teacher", seed=4)  # the first's cfg, other weights
    extra = ["--backbone-side", *map(str, side), "--teacher", *map(str, teacher),
             "--teacher", *map(str, side)]  # fmt: skip
    _, meta = load_checkpoint(main(get_args_parser().parse_args(common + extra)))
    assert meta["training"]["distill_dense_teachers"] == [None, "narrow.cfg"]
    assert meta["training"]["distill_dense_side"] is None  # nothing mixed
    # Neither backbone's layers a teacher's: refused before training.
    with pytest.raises(ValueError, match="teacher's own"):
        main(get_args_parser().parse_args(common + ["--teacher", *map(str, teacher)]))


def test_a_side_backbone_without_a_backbone_is_a_clear_cli_error(tmp_path, capsys):
    first = write_tiny_yolo(tmp_path / "first")
    voc = make_dog_voc(tmp_path / "voc")
    with pytest.raises(SystemExit) as exit_info:
        cli(["--data", str(voc), "--backbone-side", *map(str, first),
             "--out", str(tmp_path / "w.safetensors")])  # fmt: skip
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "--backbone-side runs beside a --backbone" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--distill-dense-side", "1.5"], "is a share in [0, 1], got 1.5"),
        (["--distill-dense-side", "0.7", "--distill-dense", "0"], "needs --distill-dense"),
    ],
)
def test_a_bad_dense_side_share_is_a_clear_cli_error(tmp_path, capsys, extra, message):
    first, side = write_tiny_yolo(tmp_path / "first"), write_narrow(tmp_path / "side")
    voc = make_dog_voc(tmp_path / "voc")
    with pytest.raises(SystemExit) as exit_info:
        cli(["--data", str(voc), "--backbone", *map(str, first), "--backbone-layer", "4",
             "--backbone-side", *map(str, side), "--teacher", *map(str, first),
             "--cache-views", "1", "--train-from-layer", "3", "--distill-dense", "1",
             *extra, "--out", str(tmp_path / "w.safetensors")])  # fmt: skip
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "w.safetensors").exists()
