"""The two backends: the same grid as the eval model, the same detections as
``model.postprocess`` (torchvision), ONNX NMS against ``torchvision.ops.batched_nms``, and a
service process on ONNX Runtime that never imports torch."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torchvision.ops import batched_nms

from app.backends import (
    LANES_MAX_EXPORT_BYTES,
    Backend,
    OnnxRuntimeBackend,
    TorchBackend,
    create_backend,
    default_lanes,
    default_threads,
    nms_model,
    resolve_backend_name,
    resolve_device,
)
from app.inference import DetectOptions
from model import VOC_CLASSES, build_model, save_checkpoint
from model.export import cached_onnx_path, export_onnx
from model.metadata import read_metadata

IMAGE_SIZE = 128  # yolov1-tiny at 128 px: S = 2
GRID_SHAPE = (2, 2, 30)  # (S, S, C+5B)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("yolov1-tiny", image_size=IMAGE_SIZE)
    g = torch.Generator().manual_seed(0)
    for bn in model.modules():  # non-trivial statistics, so that folding changes the weights
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    with torch.no_grad():  # a head whose scores spread over (0, 1), so that NMS has work
        model.fcs[-1].weight.mul_(8)
        model.fcs[-1].bias.uniform_(0.0, 1.0, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def weights(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    return save_checkpoint(path, tiny, {"class_names": list(VOC_CLASSES)})


@pytest.fixture(scope="module")
def metadata(weights):
    return read_metadata(weights)


@pytest.fixture(scope="module")
def onnx_file(tiny, weights):
    return export_onnx(tiny, cached_onnx_path(weights))  # where create_backend looks for it


@pytest.fixture(scope="module")
def onnx_backend(onnx_file, metadata):
    return OnnxRuntimeBackend(onnx_file, metadata, "cpu", threads=1)


@pytest.fixture(scope="module")
def torch_backend(tiny):
    return TorchBackend(tiny, "cpu")


def images(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)  # (N, 3, H, W) in [0, 1]


def assert_matches_eval_model(grid: np.ndarray, model, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x)
    assert grid.dtype == np.float32
    scale = expected.abs().max().item()
    torch.testing.assert_close(torch.from_numpy(grid), expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("batch", [1, 3])
def test_torch_backend_matches_the_eval_model(tiny, torch_backend, batch):
    x = images(batch, seed=batch)
    assert_matches_eval_model(torch_backend.forward(x), tiny, x)
    assert isinstance(torch_backend, Backend)
    assert (torch_backend.name, torch_backend.device, torch_backend.dtype) == (
        "torch",
        "cpu",
        "float32",
    )


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_backend_matches_the_eval_model(tiny, onnx_backend, batch):
    x = images(batch, seed=batch)
    assert_matches_eval_model(onnx_backend.forward(x.numpy()), tiny, x)
    assert isinstance(onnx_backend, Backend)
    assert (onnx_backend.name, onnx_backend.device, onnx_backend.dtype) == (
        "onnxruntime",
        "cpu",
        "float32",
    )


OPTIONS = [
    DetectOptions(0.0, 0.5, 1000),  # every positive score
    DetectOptions(0.05, 0.3, 1000),
    DetectOptions(0.2, 0.7, 1000),
    DetectOptions(0.05, 0.0, 1000),  # any overlap suppresses
    DetectOptions(0.05, 1.0, 1000),  # nothing is suppressed
]


@pytest.mark.parametrize(
    "option", OPTIONS, ids=lambda o: f"conf{o.conf_threshold}-iou{o.iou_threshold}"
)
def test_onnxruntime_detections_equal_torchvision_postprocess(torch_backend, onnx_backend, option):
    x = list(images(4, seed=7).numpy())
    reference = torch_backend.detect(x, [option] * 4)  # model.postprocess: batched_nms
    found = onnx_backend.detect(x, [option] * 4)
    assert sum(len(r.scores) for r in reference) > 4  # the test has detections to compare
    for ref, got in zip(reference, found, strict=True):
        np.testing.assert_array_equal(got.labels, ref.labels)
        np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.boxes, ref.boxes, rtol=1e-4, atol=1e-5)
        assert np.all(np.diff(got.scores) <= 0)  # best first
        assert np.all(got.scores > option.conf_threshold)


def test_each_image_keeps_its_own_thresholds_in_a_shared_batch(onnx_backend):
    x = list(images(4, seed=3).numpy())
    mixed = [OPTIONS[1], OPTIONS[2], OPTIONS[1], OPTIONS[4]]
    together = onnx_backend.detect(x, mixed)
    for image, option, got in zip(x, mixed, together, strict=True):
        [alone] = onnx_backend.detect([image], [option])
        np.testing.assert_array_equal(got.labels, alone.labels)
        np.testing.assert_array_equal(got.scores, alone.scores)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("iou", [0.2, 0.5])
def test_onnx_nms_graph_equals_torchvision_batched_nms(seed, iou):
    """Random overlapping boxes, 3 images x 4 classes: the same pairs survive, in score order."""
    rng = np.random.default_rng(seed)
    N, C, M = 3, 4, 40
    corner = rng.uniform(0, 0.7, (N, M, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(0.05, 0.3, (N, M, 2))], -1)
    scores = rng.uniform(0, 1, (N, C, M)).astype(np.float32)
    threshold = float(scores[0, 0, 0])  # a pair exactly at the threshold is dropped, as in torch
    session = ort.InferenceSession(nms_model(), providers=["CPUExecutionProvider"])
    (selected,) = session.run(
        None,
        {
            "boxes": boxes.astype(np.float32),
            "scores": scores,
            "max_per_class": np.array([M], np.int64),
            "iou_threshold": np.array([iou], np.float32),
            "score_threshold": np.array([threshold], np.float32),
        },
    )
    n, c, m = np.nonzero(scores > threshold)
    flat_boxes = torch.from_numpy(boxes[n, m]).float()
    flat_scores = torch.from_numpy(scores[n, c, m])
    keep = batched_nms(flat_boxes, flat_scores, torch.from_numpy(n * C + c), iou).numpy()
    expected = {(int(n[k]), int(c[k]), int(m[k])) for k in keep}
    assert {tuple(row) for row in selected.tolist()} == expected
    assert (0, 0, 0) not in expected


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_empty_batch(torch_backend, onnx_backend, kind):
    backend = torch_backend if kind == "torch" else onnx_backend
    assert backend.detect([], []) == []
    grid = backend.forward(images(0).numpy() if kind == "onnxruntime" else images(0))
    assert grid.shape == (0, *GRID_SHAPE) and grid.dtype == np.float32


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
@pytest.mark.parametrize(
    "bad",
    [
        torch.rand(3, IMAGE_SIZE, IMAGE_SIZE),
        torch.rand(1, 3, 64, 64),
        torch.zeros(1, 3, 128, 128, dtype=torch.uint8),
    ],
    ids=["no-batch-dim", "wrong-size", "uint8"],
)
def test_bad_images_raise_value_error(torch_backend, onnx_backend, kind, bad):
    backend = torch_backend if kind == "torch" else onnx_backend
    with pytest.raises(ValueError, match="images must"):
        backend.forward(bad if kind == "torch" else bad.numpy())


def test_half_on_cpu_is_refused(tiny, weights, metadata):
    with pytest.raises(ValueError, match="half precision needs a CUDA device, got cpu"):
        TorchBackend(tiny, "cpu", half=True)
    for name in ("auto", "torch", "onnxruntime"):
        with pytest.raises(ValueError, match="half precision"):
            create_backend(name, weights, metadata, "cpu", half=True)


def test_unknown_backend_name_is_named_in_the_error(weights, metadata):
    with pytest.raises(ValueError, match="'tensorrt'"):
        create_backend("tensorrt", weights, metadata, "cpu")


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


def test_auto_device_agrees_with_torch():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == "cuda:1"


def test_create_backend_uses_the_cached_export(tiny, weights, metadata, onnx_file):
    backend = create_backend("auto", weights, metadata, "cpu", threads=1)
    assert isinstance(backend, OnnxRuntimeBackend)
    x = images(2)
    assert_matches_eval_model(backend.forward(x.numpy()), tiny, x)
    assert isinstance(create_backend("torch", weights, metadata, "cpu"), TorchBackend)


def test_create_backend_exports_again_over_a_broken_cached_file(tiny, tmp_path, metadata):
    weights = save_checkpoint(tmp_path / "t.safetensors", tiny, {"class_names": list(VOC_CLASSES)})
    cached = cached_onnx_path(weights)
    cached.write_bytes(b"half an export")
    backend = create_backend("onnxruntime", weights, metadata, "cpu", threads=1)
    x = images(1)
    assert_matches_eval_model(backend.forward(x.numpy()), tiny, x)
    assert cached.stat().st_size > 1000  # replaced by the real export


def test_an_export_of_another_model_is_refused(tiny, onnx_file, metadata):
    other = {**metadata, "image_size": 192, "grid_size": 3}
    with pytest.raises(ValueError, match="not the export of this checkpoint"):
        OnnxRuntimeBackend(onnx_file, other, "cpu", threads=1)


def test_threads_default_and_must_be_positive(onnx_file, metadata, monkeypatch):
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        OnnxRuntimeBackend(onnx_file, metadata, "cpu", threads=0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == len(os.sched_getaffinity(0))


def _threads(session: ort.InferenceSession) -> int:
    return session.get_session_options().intra_op_num_threads


def test_lanes_share_a_session_of_their_share_of_the_threads(onnx_file, metadata):
    backend = OnnxRuntimeBackend(onnx_file, metadata, "cpu", threads=2, lanes=2)
    assert backend.lanes == 2
    assert (_threads(backend.session), _threads(backend.lane_session)) == (2, 1)
    one_lane = OnnxRuntimeBackend(onnx_file, metadata, "cpu", threads=2, lanes=1)
    assert one_lane.lanes == 1 and one_lane.lane_session is one_lane.session


def test_batches_on_concurrent_lanes_get_the_answers_of_a_batch_alone(onnx_file, metadata):
    backend = OnnxRuntimeBackend(onnx_file, metadata, "cpu", threads=2, lanes=2)
    batches = [list(images(3, seed=seed).numpy()) for seed in range(4)]
    options = [OPTIONS[1]] * 3
    alone = [backend.detect(batch, options) for batch in batches]
    with ThreadPoolExecutor(2) as pool:  # two lanes at once on the shared lane session
        shared = list(pool.map(lambda b: backend.detect(b, options, concurrent=True), batches))
    assert sum(len(d.scores) for batch in alone for d in batch) > 4
    for a_batch, s_batch in zip(alone, shared, strict=True):
        for a, s in zip(a_batch, s_batch, strict=True):
            np.testing.assert_array_equal(s.labels, a.labels)  # 1 thread vs 2: same maths
            np.testing.assert_allclose(s.scores, a.scores, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(s.boxes, a.boxes, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("device", "threads", "export_bytes", "expected"),
    [
        ("cpu", 2, 44 * 2**20, 2),  # yolov1-tiny's export on this machine's 2 cores
        ("cpu", 16, 44 * 2**20, 2),
        ("cpu", 1, 44 * 2**20, 1),  # nothing to split
        ("cpu", 2, LANES_MAX_EXPORT_BYTES + 1, 1),  # yolov1 (343 MB): a second copy is too dear
        ("cuda:0", 8, 44 * 2**20, 1),
    ],
)
def test_default_lanes(device, threads, export_bytes, expected):
    assert default_lanes(device, threads, export_bytes) == expected


def test_default_lanes_of_a_small_export_on_two_threads(onnx_file, metadata):
    assert OnnxRuntimeBackend(onnx_file, metadata, "cpu", threads=2).lanes == 2
    assert OnnxRuntimeBackend(onnx_file, metadata, "cpu", threads=1).lanes == 1


def test_bad_lanes_are_refused_before_any_export(weights, metadata, tmp_path):
    with pytest.raises(ValueError, match="lanes must be >= 1, got 0"):
        create_backend("onnxruntime", weights, metadata, "cpu", cache_dir=tmp_path, lanes=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="checks the fallback of a CPU-only onnxruntime",
)
def test_onnxruntime_without_cuda_provider_runs_on_the_cpu(onnx_file, metadata):
    backend = OnnxRuntimeBackend(onnx_file, metadata, "cuda", threads=1)
    assert backend.device == "cpu"
    assert backend.forward(images(1).numpy()).shape == (1, *GRID_SHAPE)


SERVE_WITHOUT_TORCH = """
import asyncio, io, json, sys
import httpx
from asgi_lifespan import LifespanManager
from PIL import Image
from app.main import create_app
from app.settings import Settings

async def main():
    app = create_app(Settings(weights=sys.argv[1], device="auto", backend="auto"))
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            out = io.BytesIO()
            Image.new("RGB", (320, 200), (90, 120, 200)).save(out, "JPEG")
            answer = await client.post("/v1/detect", files={"image": ("a.jpg", out.getvalue())})
            model = (await client.get("/v1/model")).json()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
    print(json.dumps({"status": answer.status_code, "backend": model["backend"], "torch": loaded}))

asyncio.run(main())
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks torch on a CUDA machine")
def test_the_service_on_onnxruntime_never_imports_torch(weights, onnx_file):
    """~0.8 GB of memory: a CPU service answers from the cached export without loading torch."""
    done = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_TORCH, str(weights)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "backend": "onnxruntime", "torch": []}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_backend_half_on_cuda_is_close_to_fp32(tiny):
    backend = TorchBackend(tiny, "cuda", half=True)
    x = images(2)
    grid = backend.forward(x.cuda())
    assert grid.dtype == np.float32 and backend.dtype == "float16"
    with torch.no_grad():
        expected = tiny(x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(torch.from_numpy(grid), expected, rtol=1e-2, atol=1e-2 * scale)
