"""A student backbone with a detector's stride-16 branch routed into the YOLOv1 head
(``--backbone-fine-layer``): the cfg surgery, the pretrained weights it keeps, growing a
checkpoint into it, and training and serving it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import make_dog_voc, write_darknet_weights

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import VOC_CLASSES
from model.darknet import DarknetError, ancestors, load_darknet, parse_cfg, prune_layers
from model.network import YOLOv1
from model.train import backbone_arch, get_args_parser, init_from, load_backbone, main

CONV = (
    "[convolutional]\nbatch_normalize=1\nfilters={f}\nsize={k}\nstride={s}\npad=1\n"
    "activation=leaky\n"
)
OUT = "[convolutional]\nfilters=75\nsize=1\nstride=1\npad=1\nactivation=linear\n"
YOLO = "[yolo]\nmask=0,1,2\nanchors=10,14,23,27,37,58\nclasses=20\nnum=3\n"
# A two-scale detector (as yolov3-tiny), 64 px in. Layers: 0 conv /2, 1 maxpool /4, 2 conv /8,
# 3 maxpool /16 (4x4), 4 conv /32 (2x2), 5 conv (the stride-32 features), 6 out, 7 yolo,
# 8 route 4, 9 upsample (4x4), 10 route 9+3, 11 conv (the stride-16 features), 12 out, 13 yolo.
TWO_SCALE = (
    "[net]\nwidth=64\nheight=64\nchannels=3\n"
    + CONV.format(f=8, k=3, s=2)
    + "[maxpool]\nsize=2\nstride=2\n"
    + CONV.format(f=8, k=3, s=2)
    + "[maxpool]\nsize=2\nstride=2\n"
    + CONV.format(f=16, k=3, s=2)
    + CONV.format(f=16, k=1, s=1)
    + OUT
    + YOLO
    + "[route]\nlayers=-4\n[upsample]\nstride=2\n[route]\nlayers=-1,3\n"
    + CONV.format(f=16, k=3, s=1)
    + OUT
    + YOLO
)
# (inputs, filters, kernel, batch norm) of each conv in file order: Darknet's weights layout.
CONVS = [(3, 8, 3, True), (8, 8, 3, True), (8, 16, 3, True), (16, 16, 1, True),
         (16, 75, 1, False), (24, 16, 3, True), (16, 75, 1, False)]  # fmt: skip


def write_two_scale(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "two.cfg"
    cfg.write_text(TWO_SCALE)
    return cfg, write_darknet_weights(folder / "two.weights", CONVS)


def student(cfg: Path, fine: int | None = 11) -> YOLOv1:
    arch = backbone_arch(cfg, 5, fine_layer=fine)
    return YOLOv1(arch, 20, 2, 64, mean=(0, 0, 0), std=(1, 1, 1)).eval()


def test_pruning_keeps_what_a_layer_needs_and_renumbers_routes():
    sections = parse_cfg(TWO_SCALE)
    # Worked by hand: 11 reads 10, which routes 9 and 3; 9 reads 8, which routes 4.
    assert ancestors(sections, 11) == {11, 10, 9, 8, 4, 3, 2, 1, 0}
    pruned, index = prune_layers(sections, set(range(6)) | ancestors(sections, 11))
    assert index == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 8: 6, 9: 7, 10: 8, 11: 9}
    kinds = [s.kind for s in pruned[1:]]
    assert kinds == ["convolutional", "maxpool", "convolutional", "maxpool", "convolutional",
                     "convolutional", "route", "upsample", "route", "convolutional"]  # fmt: skip
    assert pruned[7].get("layers") == "4" and pruned[9].get("layers") == "7,3"
    with pytest.raises(DarknetError, match="not kept"):
        prune_layers(sections, {0, 1, 2, 3, 8, 9, 10, 11})  # route 8 reads the dropped 4
    with pytest.raises(DarknetError, match=r"not kept \(\[1\]\)"):
        prune_layers(sections, {0, 2})  # a conv reads the layer before it


def test_shortcut_sources_are_renumbered():
    text = ("[net]\nwidth=8\nheight=8\nchannels=3\n" + CONV.format(f=4, k=1, s=1) * 2
            + "[shortcut]\nfrom=-2\nactivation=linear\n")  # fmt: skip
    sections = parse_cfg(text)
    pruned, _ = prune_layers(sections, {0, 1, 2})
    assert pruned[3].get("from") == "0"


def test_the_fine_student_routes_both_pretrained_maps_into_the_head(tmp_path):
    cfg, weights = write_two_scale(tmp_path)
    model = student(cfg)
    load_backbone(model, cfg, weights, 5, 11)
    net = model.stem.net
    assert net.out_channels == 16 + 128 and net.out_size == (2, 2) and model.grid_size == 2
    teacher = load_darknet(cfg, weights)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        coarse = teacher(x, upto=5)[0]
        fine = teacher(x, upto=11)[0]  # the teacher's own stride-16 map (4x4)
        routed = net(x)[-1]
        # Independent of the student's pruned indices: the teacher's maps, and the new 2x2
        # stride-2 conv (the only layer without pretrained weights) on the fine one.
        torch.testing.assert_close(routed[:, :16], coarse)
        torch.testing.assert_close(routed[:, 16:], net.layers[10](fine))
    assert net.layers[10].conv.kernel_size == (2, 2) and net.layers[10].conv.stride == (2, 2)
    # A split must not cut the route to the stride-16 map (layer 3).
    net.check_split(4)
    with pytest.raises(ValueError, match="reads layer"):
        net.check_split(6)


def test_a_checkpoint_grows_into_the_fine_student_unchanged(tmp_path):
    """--init from a stride-32-only checkpoint: the head conv's new inputs start at zero, so
    the grown network computes what the checkpoint did."""
    cfg, weights = write_two_scale(tmp_path)
    old = student(cfg, fine=None)
    load_backbone(old, cfg, weights, 5, None)
    torch.nn.init.normal_(old.darknet[0].conv.weight)  # a head conv that is not the init's
    path = save_checkpoint(tmp_path / "old.safetensors", old, {"class_names": list(VOC_CLASSES)})
    grown = student(cfg)
    load_backbone(grown, cfg, weights, 5, 11)
    init_from(grown, path)
    conv = grown.darknet[0].conv.weight
    assert conv.shape[1] == 144 and conv[:, 16:].abs().sum() == 0
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grown(x), old(x))
    with pytest.raises(ValueError, match="must be in 6..13"):
        backbone_arch(cfg, 5, fine_layer=5)


def test_a_checkpoint_grows_into_a_wider_hidden_layer_unchanged(tmp_path):
    """--init into --head-hidden wider than the checkpoint's: the new hidden units keep their
    fresh weights, the output layer's new inputs start at zero, so the output is unchanged and
    the new units are live (a change of their output weights changes the output)."""
    cfg, weights = write_two_scale(tmp_path)
    old = YOLOv1(backbone_arch(cfg, 5, hidden=12), 20, 2, 64, mean=(0, 0, 0), std=(1, 1, 1))
    load_backbone(old, cfg, weights, 5, None)
    old.eval()
    path = save_checkpoint(tmp_path / "old.safetensors", old, {"class_names": list(VOC_CLASSES)})
    grown = YOLOv1(backbone_arch(cfg, 5, hidden=40), 20, 2, 64, mean=(0, 0, 0), std=(1, 1, 1))
    fresh = grown.fcs[1].weight[12:].clone()
    init_from(grown, path)
    grown.eval()
    hidden, out = grown.fcs[1], grown.fcs[4]
    assert torch.equal(hidden.weight[:12], old.fcs[1].weight)
    assert torch.equal(hidden.weight[12:], fresh) and fresh.abs().sum() > 0
    assert torch.equal(hidden.bias[:12], old.fcs[1].bias)
    assert out.weight.shape[1] == 40
    assert out.weight[:, 12:].abs().sum() == 0
    assert torch.equal(out.weight[:, :12], old.fcs[4].weight)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grown(x), old(x))
        out.weight[:, 12:] = 0.1
        assert (grown(x) - old(x)).abs().max() > 1e-3


def test_train_the_fine_student_on_cached_features_and_reload_it(tmp_path):
    cfg, weights = write_two_scale(tmp_path / "teacher")
    voc = make_dog_voc(tmp_path / "voc")
    args = get_args_parser().parse_args(
        ["--data", str(voc), "--img-size", "64", "--epochs", "1", "--batch-size", "4",
         "--optimizer", "adamw", "--lr", "1e-3", "--workers", "0", "--no-progress",
         "--backbone", str(cfg), str(weights), "--backbone-layer", "5",
         "--backbone-fine-layer", "11", "--cache-views", "2", "--train-from-layer", "4",
         "--out", str(tmp_path / "run" / "w.safetensors")]
    )  # fmt: skip
    model, meta = load_checkpoint(main(args))
    assert "[upsample]" in meta["architecture"]["darknet_cfg"] and model.grid_size == 2
    teacher = load_darknet(cfg, weights)
    # Cached (frozen) layers are the teacher's; the reloaded network runs end to end.
    torch.testing.assert_close(model.stem.net.layers[2].conv.weight, teacher.layers[2].conv.weight)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2, 2, 30)
