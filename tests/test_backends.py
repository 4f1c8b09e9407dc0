import onnxruntime as ort
import pytest
import torch

from app.backends import (
    Backend,
    OnnxRuntimeBackend,
    TorchBackend,
    create_backend,
    resolve_backend_name,
)
from model import build_model
from model.export import export_onnx

IMAGE_SIZE = 128  # yolov1-tiny at 128 px: S = 2
GRID_SHAPE = (2, 2, 30)  # (S, S, C+5B)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("yolov1-tiny", image_size=IMAGE_SIZE)
    g = torch.Generator().manual_seed(0)
    for bn in model.modules():  # non-trivial statistics, so that folding changes the weights
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def onnx_file(tiny, tmp_path_factory):
    return export_onnx(tiny, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def onnx_backend(onnx_file):
    return OnnxRuntimeBackend(onnx_file, "cpu", threads=1)


def images(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)  # (N, 3, H, W) in [0, 1]


def assert_matches_eval_model(grid: torch.Tensor, model, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x)
    assert grid.dtype == torch.float32
    scale = expected.abs().max().item()
    torch.testing.assert_close(grid, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("batch", [1, 3])
def test_torch_backend_matches_the_eval_model(tiny, batch):
    backend = TorchBackend(tiny, "cpu")
    x = images(batch, seed=batch)
    assert_matches_eval_model(backend(x), tiny, x)
    assert isinstance(backend, Backend)
    assert (backend.name, backend.device, backend.dtype) == (
        "torch",
        torch.device("cpu"),
        torch.float32,
    )


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_backend_matches_the_eval_model(tiny, onnx_backend, batch):
    x = images(batch, seed=batch).contiguous(memory_format=torch.channels_last)
    assert_matches_eval_model(onnx_backend(x), tiny, x)
    assert isinstance(onnx_backend, Backend)
    assert onnx_backend.name == "onnxruntime" and onnx_backend.device == torch.device("cpu")


@pytest.mark.parametrize("backend_kind", ["torch", "onnxruntime"])
def test_empty_batch_gives_an_empty_grid(tiny, onnx_backend, backend_kind):
    backend = TorchBackend(tiny, "cpu") if backend_kind == "torch" else onnx_backend
    grid = backend(images(0))
    assert grid.shape == (0, *GRID_SHAPE) and grid.dtype == torch.float32


@pytest.mark.parametrize("backend_kind", ["torch", "onnxruntime"])
@pytest.mark.parametrize(
    "bad",
    [
        torch.rand(3, IMAGE_SIZE, IMAGE_SIZE),
        torch.rand(1, 3, 64, 64),
        torch.zeros(1, 3, 128, 128, dtype=torch.uint8),
    ],
    ids=["no-batch-dim", "wrong-size", "uint8"],
)
def test_bad_images_raise_value_error(tiny, onnx_backend, backend_kind, bad):
    backend = TorchBackend(tiny, "cpu") if backend_kind == "torch" else onnx_backend
    with pytest.raises(ValueError, match="images must"):
        backend(bad)


def test_half_on_cpu_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match="half precision needs a CUDA device, got cpu"):
        TorchBackend(tiny, "cpu", half=True)
    for name in ("auto", "torch", "onnxruntime"):
        with pytest.raises(ValueError, match="half precision"):
            create_backend(name, tiny, tmp_path / "unused.safetensors", "cpu", half=True)


def test_unknown_backend_name_is_named_in_the_error(tiny, tmp_path):
    with pytest.raises(ValueError, match="'tensorrt'"):
        create_backend("tensorrt", tiny, tmp_path / "unused.safetensors", "cpu")


@pytest.mark.parametrize(
    ("name", "device", "expected"),
    [
        ("auto", "cpu", "onnxruntime"),
        ("auto", "cuda", "torch"),
        ("auto", "cuda:1", "torch"),
        ("torch", "cpu", "torch"),
        ("onnxruntime", "cuda", "onnxruntime"),
    ],
)
def test_auto_picks_onnxruntime_on_cpu_and_torch_on_cuda(name, device, expected):
    assert resolve_backend_name(name, device) == expected


def test_create_backend_exports_once_and_caches(tiny, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    weights.write_bytes(b"stand-in weights: the cache key reads only the bytes")
    backend = create_backend("auto", tiny, weights, "cpu", cache_dir=tmp_path / "cache", threads=1)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".onnx"]
    x = images(2)
    assert_matches_eval_model(backend(x), tiny, x)
    assert isinstance(create_backend("torch", tiny, weights, "cpu"), TorchBackend)


def test_threads_must_be_positive(onnx_file):
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        OnnxRuntimeBackend(onnx_file, "cpu", threads=0)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="checks the fallback of a CPU-only onnxruntime",
)
def test_onnxruntime_without_cuda_provider_runs_on_the_cpu(onnx_file):
    backend = OnnxRuntimeBackend(onnx_file, "cuda", threads=1)
    assert backend.device == torch.device("cpu")
    assert backend(images(1)).shape == (1, *GRID_SHAPE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_backend_half_on_cuda_is_close_to_fp32(tiny):
    backend = TorchBackend(tiny, "cuda", half=True)
    x = images(2)
    grid = backend(x.cuda())
    assert grid.dtype == torch.float32 and backend.dtype == torch.float16
    with torch.no_grad():
        expected = tiny(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(grid.cpu(), expected, rtol=1e-2, atol=1e-2 * scale)
