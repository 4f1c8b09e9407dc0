import shutil
import tempfile

import onnx
import onnxruntime as ort
import pytest
import torch

from model import build_model, save_checkpoint
from model.export import (
    EXPORT_VERSION,
    cached_onnx_path,
    ensure_onnx,
    export_in_subprocess,
    export_onnx,
)
from model.postprocess import candidates

IMAGE_SIZE = 128  # yolov1-tiny at 128 px: S = 2, fast enough to export in every run


def randomise_batchnorm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics, so that folding them changes the weights."""
    g = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            bn.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def make_tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_batchnorm(build_model("yolov1-tiny", image_size=IMAGE_SIZE), seed=0)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    return export_onnx(tiny, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture
def weights(tmp_path):
    """A stand-in weights file: the cache only ever reads its bytes."""
    path = tmp_path / "weights" / "tiny.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"version 1")
    return path


class FakeExporter:
    """Stands in for the child-process exporter: copies the real export, records each path."""

    def __init__(self, exported):
        self.exported = exported
        self.written = []

    def __call__(self, weights, path):
        self.written.append(path)
        return shutil.copyfile(self.exported, path)


@pytest.fixture
def fake_exporter(exported):
    return FakeExporter(exported)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_pytorch_for_any_batch_size(tiny, exported, batch):
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    images = torch.rand(
        batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1)
    )
    grid, boxes, scores = session.run(["grid", "boxes", "scores"], {"images": images.numpy()})
    with torch.no_grad():
        expected = tiny(images)
        expected_boxes, expected_scores = candidates(expected, 2, 20)
    scale = expected.abs().max().item()
    torch.testing.assert_close(torch.from_numpy(grid), expected, rtol=1e-4, atol=1e-4 * scale)
    # The decoded boxes and scores are the same functions, traced: equal up to the grid's error.
    torch.testing.assert_close(torch.from_numpy(boxes), expected_boxes, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        torch.from_numpy(scores), expected_scores.transpose(1, 2), rtol=1e-4, atol=1e-4 * scale
    )


def test_export_has_named_io_and_a_dynamic_batch(exported):
    graph = onnx.load(str(exported)).graph

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [(v.name, dims(v)[1:]) for v in graph.input] == [("images", [3, 128, 128])]
    S, M = 2, 2 * 2 * 2  # yolov1-tiny at 128 px: S = 2, B = 2
    assert [(v.name, dims(v)[1:]) for v in graph.output] == [
        ("grid", [S, S, 30]),
        ("boxes", [M, 4]),
        ("scores", [20, M]),
    ]
    assert all(isinstance(dims(v)[0], str) for v in [*graph.input, *graph.output])  # dynamic N


def test_export_does_not_modify_the_model(tiny, exported):
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in tiny.modules())
    untouched = make_tiny().state_dict()
    for name, tensor in tiny.state_dict().items():
        torch.testing.assert_close(tensor, untouched[name], rtol=0, atol=0)


def test_failed_export_leaves_no_file(tiny, tmp_path, monkeypatch):
    def failing_export(model, args, f, **kwargs):
        f.write_bytes(b"half a model")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_onnx(tiny, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cache_key_follows_the_weights_content(weights, tmp_path):
    first = cached_onnx_path(weights)
    assert first.parent == weights.parent
    assert first.name.startswith("tiny.") and first.name.endswith(f".v{EXPORT_VERSION}.onnx")
    assert cached_onnx_path(weights) == first
    assert cached_onnx_path(weights, tmp_path / "cache") == tmp_path / "cache" / first.name
    weights.write_bytes(b"version 2")
    assert cached_onnx_path(weights) != first


def test_ensure_onnx_exports_once_then_reuses(weights, fake_exporter):
    path = ensure_onnx(weights, exporter=fake_exporter)
    assert path == cached_onnx_path(weights)
    mtime = path.stat().st_mtime_ns
    assert ensure_onnx(weights, exporter=fake_exporter) == path
    assert fake_exporter.written == [path]
    assert path.stat().st_mtime_ns == mtime


def test_ensure_onnx_reexports_when_the_weights_change(weights, fake_exporter):
    first = ensure_onnx(weights, exporter=fake_exporter)
    weights.write_bytes(b"version 2")
    second = ensure_onnx(weights, exporter=fake_exporter)
    assert second != first
    assert fake_exporter.written == [first, second]


def test_ensure_onnx_replace_writes_a_fresh_export_over_the_cached_one(weights, fake_exporter):
    path = cached_onnx_path(weights)
    path.write_bytes(b"not an onnx file")
    assert ensure_onnx(weights, exporter=fake_exporter) == path  # found: the caller judges it
    assert fake_exporter.written == []
    assert ensure_onnx(weights, replace=True, exporter=fake_exporter) == path
    assert fake_exporter.written == [path]
    assert path.read_bytes() == fake_exporter.exported.read_bytes()


def test_ensure_onnx_uses_the_given_cache_dir(weights, fake_exporter, tmp_path):
    path = ensure_onnx(weights, tmp_path / "cache", exporter=fake_exporter)
    assert path == cached_onnx_path(weights, tmp_path / "cache")


def test_ensure_onnx_falls_back_to_the_temp_dir_when_unwritable(
    weights, fake_exporter, tmp_path, monkeypatch
):
    # A file where the cache directory should be: unwritable even for root, unlike chmod 0o555.
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "system-tmp"))
    path = ensure_onnx(weights, blocked, exporter=fake_exporter)
    assert path == tmp_path / "system-tmp" / "yolov1-onnx" / cached_onnx_path(weights).name
    assert ensure_onnx(weights, blocked, exporter=fake_exporter) == path  # found there next time
    assert len(fake_exporter.written) == 1


def test_the_child_process_exports_a_checkpoint(tiny, tmp_path):
    weights = save_checkpoint(
        tmp_path / "tiny.safetensors", tiny, {"class_names": list("abcdefghijklmnopqrst")}
    )
    out = export_in_subprocess(weights, tmp_path / "tiny.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    (grid,) = session.run(["grid"], {"images": images.numpy()})
    with torch.no_grad():
        expected = tiny(images)
    scale = expected.abs().max().item()
    torch.testing.assert_close(torch.from_numpy(grid), expected, rtol=1e-4, atol=1e-4 * scale)


def test_a_failing_child_export_names_the_problem(tmp_path):
    weights = tmp_path / "broken.safetensors"
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(
        RuntimeError, match="ONNX export of .*broken.safetensors failed: .*safetensors"
    ):
        export_in_subprocess(weights, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
