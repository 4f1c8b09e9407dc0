import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from model import VOC_CLASSES, CheckpointError, build_model, load_checkpoint, save_checkpoint
from model.checkpoint import METADATA_KEY, read_metadata


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = build_model("yolov1-tiny", num_classes=3, image_size=128)
    for m in model.modules():  # non-trivial BatchNorm statistics must survive the round trip
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    return model.eval()


@pytest.fixture
def saved(tmp_path, tiny):
    path = tmp_path / "w.safetensors"
    save_checkpoint(path, tiny, {"class_names": ["cat", "dog", "fox"], "training": {"epochs": 3}})
    return path


def test_round_trip(saved, tiny):
    model, meta = load_checkpoint(saved)
    assert (meta["arch"], meta["grid_size"], meta["num_classes"]) == ("yolov1-tiny", 2, 3)
    assert meta["boxes_per_cell"] == 2 and meta["image_size"] == 128
    assert meta["class_names"] == ["cat", "dog", "fox"] and meta["training"] == {"epochs": 3}
    assert meta["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert not model.training
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny(x))


def test_half_precision_file_is_smaller_and_close(tmp_path, tiny):
    full, half = tmp_path / "f.safetensors", tmp_path / "h.safetensors"
    save_checkpoint(full, tiny, {"class_names": ["a", "b", "c"]})
    save_checkpoint(half, tiny, {"class_names": ["a", "b", "c"]}, dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    model, _ = load_checkpoint(half)
    assert next(model.parameters()).dtype == torch.float32
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        ref = tiny(x)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file") as info:
        load_checkpoint(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(info.value)


def test_truncated_file(tmp_path, saved):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_checkpoint(cut)


class Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_renamed_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(evil)
    assert not (tmp_path / "PWNED").exists()


def test_foreign_safetensors_without_metadata(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="no 'yolov1' metadata"):
        load_checkpoint(path)


def rewrite_metadata(src, dst, **changes):
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        meta = json.loads(f.metadata()[METADATA_KEY])
    if "arch" in changes and "architecture" not in changes:
        meta.pop("architecture")  # a format-1 checkpoint: the name alone says the architecture
    meta.update(changes)
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(meta)})


def test_class_count_disagreeing_with_metadata(tmp_path, saved):
    bad = tmp_path / "bad.safetensors"
    rewrite_metadata(saved, bad, num_classes=20)
    with pytest.raises(CheckpointError, match="num_classes=20 but lists 3"):
        load_checkpoint(bad)


def test_tensor_shapes_disagreeing_with_metadata(tmp_path, saved):
    bad = tmp_path / "bad.safetensors"
    rewrite_metadata(saved, bad, num_classes=4, class_names=["a", "b", "c", "d"])
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(bad)


def test_architecture_disagreeing_with_tensors(tmp_path, saved):
    bad = tmp_path / "bad.safetensors"
    rewrite_metadata(saved, bad, arch="yolov1")
    with pytest.raises(CheckpointError, match="disagree"):
        load_checkpoint(bad)


def test_unknown_architecture(tmp_path, saved):
    bad = tmp_path / "bad.safetensors"
    rewrite_metadata(saved, bad, arch="resnet50")
    with pytest.raises(CheckpointError, match="unknown architecture"):
        read_metadata(bad)


def test_invalid_self_described_architecture(tmp_path, saved):
    bad = tmp_path / "bad.safetensors"
    rewrite_metadata(saved, bad, architecture={"name": "x", "layers": [[3, 16, 1]]})
    with pytest.raises(CheckpointError, match="invalid architecture"):
        read_metadata(bad)


def test_format1_checkpoint_without_architecture_loads(tmp_path, saved, tiny):
    old = tmp_path / "old.safetensors"
    rewrite_metadata(saved, old, arch=tiny.arch, format_version=1)
    model, meta = load_checkpoint(old)
    assert "architecture" not in meta
    x = torch.rand(1, 3, tiny.image_size, tiny.image_size)
    torch.testing.assert_close(model(x), tiny.eval()(x))


def test_save_requires_matching_class_names(tmp_path, tiny):
    with pytest.raises(ValueError, match="class"):
        save_checkpoint(tmp_path / "x.safetensors", tiny, {"class_names": list(VOC_CLASSES)})
    with pytest.raises(ValueError, match="class_names"):
        save_checkpoint(tmp_path / "x.safetensors", tiny, {})


def test_default_public_api_shape():
    import model
    import model.postprocess  # the submodule must not shadow the function of the same name

    for name in ("build_model", "encode_targets", "YOLOv1Loss", "postprocess", "save_checkpoint",
                 "load_checkpoint"):  # fmt: skip
        assert callable(getattr(model, name))


def test_update_metadata_keeps_tensors(saved):
    from model.checkpoint import update_metadata

    before, _ = load_checkpoint(saved)
    meta = update_metadata(saved, conf_threshold=0.12)
    after, reread = load_checkpoint(saved)
    assert meta["conf_threshold"] == reread["conf_threshold"] == 0.12
    assert reread["class_names"] == ["cat", "dog", "fox"]
    reference = before.state_dict()
    for name, tensor in after.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
