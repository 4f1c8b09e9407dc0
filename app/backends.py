"""Inference backends: from a batch of images to one ``Detections`` per image.

Every backend takes images of shape (3, H, W), float RGB in [0, 1] (H = W = the model's
``image_size``), and per-image ``DetectOptions``, and returns every detection over the
options' thresholds, best first (``app.inference.select`` applies the class filter and the
limit). Both compute the same thing:
- ``TorchBackend``: eager PyTorch, then ``model.postprocess`` (torchvision's ``batched_nms``);
- ``OnnxRuntimeBackend``: the graph of ``model.export`` (network, box decoding and scores),
  then ONNX's ``NonMaxSuppression`` (per image and class, as ``batched_nms``) in ONNX Runtime;
  on the CPU optionally its int8 engine (``model.quantize``: the network in int8, the rest float).

The ONNX Runtime backend never imports torch, which on its own holds ~0.8 GB of a process's
memory (CUDA build); the export it runs on is written by a child process.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from app.detections import Detections, DetectOptions, Pixels
from model.export import INPUT_NAME, OUTPUT_NAMES, ensure_onnx
from model.quantize import QuantizeSettings, ensure_int8, training_data

if TYPE_CHECKING:
    import torch

    from model.network import YOLOv1

logger = logging.getLogger(__name__)

BackendName = Literal["auto", "torch", "onnxruntime"]
BACKEND_NAMES: tuple[str, ...] = ("auto", "torch", "onnxruntime")
PRECISION_NAMES: tuple[str, ...] = ("auto", "fp32", "int8")


@runtime_checkable
class Backend(Protocol):
    """Runs the network and NMS on a batch (see the module's docstring).

    ``device`` is where inputs are best placed ("cpu", "cuda:0", ...); ``dtype`` is the
    precision the network computes in ("float32", "float16", "int8"). ``lanes`` is how many batches
    may usefully run at once; ``detect(..., concurrent=True)`` runs one of them, on that
    lane's share of the threads.
    """

    name: str
    device: str
    dtype: str
    lanes: int

    def forward(self, images: Pixels) -> np.ndarray:
        """(N, 3, H, W) -> the raw grid (N, S, S, C+5B) as float32 numpy."""
        ...

    def detect(
        self,
        images: Sequence[Pixels],
        options: Sequence[DetectOptions],
        concurrent: bool = False,
    ) -> list[Detections]: ...


def _check_images(shape: tuple[int, ...], floating: bool, image_size: int) -> None:
    if len(shape) != 4 or tuple(shape[1:]) != (3, image_size, image_size):
        raise ValueError(
            f"images must have shape (N, 3, {image_size}, {image_size}), got {tuple(shape)}"
        )
    if not floating:
        raise ValueError("images must be floating point in [0, 1]")


def _to_detections(boxes: Any, scores: Any, labels: Any) -> Detections:
    return Detections(
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(scores, dtype=np.float32),
        np.asarray(labels, dtype=np.int64),
    )


class TorchBackend:
    """Eager PyTorch on a BatchNorm-folded, channels_last copy of the model.

    Images already on ``device`` are used where they are (GPU-decoded uploads); host images
    are copied to a CUDA device through pinned memory.
    """

    name = "torch"
    lanes = 1  # PyTorch's intra-op pool and CUDA's stream are shared: one batch at a time

    def __init__(self, model: YOLOv1, device: str, half: bool = False):
        import torch

        from model.network import prepare_for_inference

        self._torch = torch
        self._device = torch.device(device)
        if half and self._device.type != "cuda":
            raise ValueError(f"half precision needs a CUDA device, got {device}")
        self._dtype = torch.float16 if half else torch.float32
        self.device, self.dtype = str(self._device), str(self._dtype).removeprefix("torch.")
        self.model = prepare_for_inference(model, self._device, self._dtype)
        S, C, B = model.grid_size, model.num_classes, model.boxes_per_cell
        self._image_size = model.image_size
        self._grid_shape = (S, S, C + 5 * B)
        self._B, self._C = B, C

    def _grid(self, images: torch.Tensor) -> torch.Tensor:
        torch = self._torch
        _check_images(tuple(images.shape), images.is_floating_point(), self._image_size)
        if images.shape[0] == 0:  # view(-1, ...) cannot infer N from an empty batch
            return torch.empty((0, *self._grid_shape))
        with torch.inference_mode():
            if images.device.type == "cpu" and self._device.type == "cuda":
                # From pinned memory the copy is asynchronous: the host goes on queueing work.
                images = images.pin_memory().to(self._device, non_blocking=True)
            x = images.to(self._device, self._dtype, memory_format=torch.channels_last)
            return self.model(x).float().cpu()  # (N, S, S, C+5B)

    def _stack(self, images: Sequence[Pixels]) -> torch.Tensor:
        torch = self._torch
        return torch.stack([torch.as_tensor(image) for image in images])

    def forward(self, images: Pixels) -> np.ndarray:
        return self._grid(self._torch.as_tensor(images)).numpy()

    def detect(
        self,
        images: Sequence[Pixels],
        options: Sequence[DetectOptions],
        concurrent: bool = False,
    ) -> list[Detections]:
        if not images:
            return []
        return detections_from_grid(self._grid(self._stack(images)), options, self._B, self._C)


def detections_from_grid(
    grid: torch.Tensor, options: Sequence[DetectOptions], B: int, C: int
) -> list[Detections]:
    """``model.postprocess`` (torchvision's NMS) on a raw (N, S, S, C+5B) grid, each image
    with its own options; every detection is kept (``app.inference.select`` cuts after)."""
    from model.postprocess import postprocess

    S = grid.shape[1]
    found = []
    for i, option in enumerate(options):
        (kept,) = postprocess(
            grid[i : i + 1], B, C, option.conf_threshold, option.iou_threshold, S * S * B * C
        )
        found.append(_to_detections(kept["boxes"], kept["scores"], kept["labels"]))
    return found


def nms_model(opset: int = 17) -> bytes:
    """A one-node ONNX graph: ``NonMaxSuppression`` per image and class.

    Inputs: ``boxes`` (N, M, 4) xyxy, ``scores`` (N, C, M), ``max_per_class`` int64 (1,),
    ``iou_threshold`` and ``score_threshold`` float (1,). Output ``selected`` (K, 3) int64 rows
    (image, class, box). A pair is kept when its score is over ``score_threshold`` and no
    better pair of its image and class overlaps it by an IoU over ``iou_threshold``: the
    rule of ``model.postprocess`` (threshold, then ``torchvision.ops.batched_nms``).
    """
    float_in = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", "M", 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", "C", "M"]),
    ]
    scalars = [
        helper.make_tensor_value_info("max_per_class", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("iou_threshold", TensorProto.FLOAT, [1]),
        helper.make_tensor_value_info("score_threshold", TensorProto.FLOAT, [1]),
    ]
    node = helper.make_node(
        "NonMaxSuppression",
        ["boxes", "scores", "max_per_class", "iou_threshold", "score_threshold"],
        ["selected"],
        center_point_box=0,  # corners, in either order
    )
    out = helper.make_tensor_value_info("selected", TensorProto.INT64, ["K", 3])
    graph = helper.make_graph([node], "yolov1_nms", float_in + scalars, [out])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)]
    ).SerializeToString()


def _session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Measured with benchmarks/serving.py: the arena keeps the largest batch's activations
    # for good (peak 795 -> 531 MB for yolov1-tiny at batch 16, same speed), and spinning
    # idle threads starve the decode pool (c1 p50 87-117 -> 66-69 ms).
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


# A second session holds a second copy of the weights (measured: +100 MB for the 44 MB
# yolov1-tiny export, +420 MB for the 343 MB yolov1 one), so lanes are on by default only for
# exports up to this size.
LANES_MAX_EXPORT_BYTES = 128 * 2**20


def default_lanes(device: str, threads: int, export_bytes: int) -> int:
    """Batches the ONNX Runtime backend runs at once by default: 2 or 1.

    Two on the CPU when there are threads to split and the export is small. Measured with
    benchmarks/serving.py (yolov1-tiny, 2 cores, concurrency 16): two lanes of one thread
    served 47.1 images/s against 41.7 for one batch at a time on two threads, whose threads
    wait for each other after every layer while decoding and HTTP take the cores.
    """
    if device != "cpu" or threads < 2 or export_bytes > LANES_MAX_EXPORT_BYTES:
        return 1
    return 2


def default_threads() -> int:
    """OMP_NUM_THREADS when set (as torch reads it), else the CPUs this process may use."""
    if (value := os.environ.get("OMP_NUM_THREADS", "").strip()).isdigit() and int(value) > 0:
        return int(value)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class OnnxRuntimeBackend:
    """ONNX Runtime on an export written by ``model.export`` (``dtype`` "float32") or its int8
    engine written by ``model.quantize`` ("int8"); results come back on the CPU."""

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | Path,
        metadata: dict[str, Any],
        device: str = "cpu",
        threads: int | None = None,
        lanes: int | None = None,
        dtype: str = "float32",
    ):
        if dtype not in ("float32", "int8"):
            raise ValueError(f"dtype must be float32 or int8, got {dtype!r}")
        if dtype == "int8" and device != "cpu":
            raise ValueError(f"the int8 engine runs on the CPU, got device {device!r}")
        self.dtype = dtype
        threads = default_threads() if threads is None else threads
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if lanes is not None and lanes < 1:  # before any session is built
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        options = _session_options(threads)
        providers: list = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                index = int(device.partition(":")[2] or 0)
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
            else:
                logger.warning("onnxruntime has no CUDAExecutionProvider; running on the CPU")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        # ONNX Runtime falls back to the CPU when the CUDA libraries fail to load.
        on_cuda = "CUDAExecutionProvider" in self.session.get_providers()
        self.device = device if on_cuda else "cpu"
        self._check_signature(onnx_path, metadata)
        if lanes is None:
            lanes = default_lanes(self.device, threads, os.path.getsize(onnx_path))
        if lanes > 1 and on_cuda:
            logger.warning("one lane on CUDA: concurrent batches would share one GPU stream")
            lanes = 1
        self.lanes = lanes
        # The lanes share one session of threads / lanes threads (a session runs concurrent
        # calls safely); a batch that runs alone gets the session of all the threads.
        self.lane_session = self.session
        if lanes > 1:
            self.lane_session = ort.InferenceSession(
                str(onnx_path), _session_options(max(1, threads // lanes)), providers=providers
            )
        self._image_size = metadata["image_size"]
        S, B, C = metadata["grid_size"], metadata["boxes_per_cell"], metadata["num_classes"]
        self._grid_shape = (S, S, C + 5 * B)
        self._boxes = S * S * B  # M: box predictions per image
        self._classes = C
        # NMS is cheap and sequential: one thread, on the CPU, where the scores already are.
        self.nms = ort.InferenceSession(
            nms_model(), _session_options(1), providers=["CPUExecutionProvider"]
        )
        logger.info(
            "onnxruntime session on %s with %d threads, %d lane(s)",
            self.session.get_providers(), threads, lanes,
        )  # fmt: skip

    def _check_signature(self, onnx_path: str | Path, metadata: dict[str, Any]) -> None:
        S, B, C = metadata["grid_size"], metadata["boxes_per_cell"], metadata["num_classes"]
        H, M = metadata["image_size"], S * S * B
        expected = {
            INPUT_NAME: [3, H, H],
            "grid": [S, S, C + 5 * B],
            "boxes": [M, 4],
            "scores": [C, M],
        }
        found = {v.name: v.shape[1:] for v in self.session.get_inputs()}
        found |= {v.name: v.shape[1:] for v in self.session.get_outputs()}
        batch_dims = [v.shape[0] for v in [*self.session.get_inputs(), *self.session.get_outputs()]]
        if found != expected or any(isinstance(d, int) for d in batch_dims):
            raise ValueError(
                f"{onnx_path} is not the export of this checkpoint: expected (batch, ...) "
                f"{expected}, found {found} with batch dimensions {batch_dims}"
            )

    def _run(
        self, images: np.ndarray, concurrent: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        _check_images(images.shape, np.issubdtype(images.dtype, np.floating), self._image_size)
        if images.shape[0] == 0:
            M, C = self._boxes, self._classes
            return (
                np.empty((0, *self._grid_shape), np.float32),
                np.empty((0, M, 4), np.float32),
                np.empty((0, C, M), np.float32),
            )
        x = np.ascontiguousarray(images, dtype=np.float32)
        session = self.lane_session if concurrent else self.session
        grid, boxes, scores = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return grid, boxes, scores

    def forward(self, images: Pixels) -> np.ndarray:
        return self._run(np.asarray(images))[0]

    def detect(
        self,
        images: Sequence[Pixels],
        options: Sequence[DetectOptions],
        concurrent: bool = False,
    ) -> list[Detections]:
        if not images:
            return []
        batch = np.stack([np.asarray(image) for image in images])
        _, boxes, scores = self._run(batch, concurrent)
        # One NMS run per distinct (conf, iou): usually the whole batch shares them.
        groups: dict[tuple[float, float], list[int]] = defaultdict(list)
        for i, option in enumerate(options):
            groups[option.conf_threshold, option.iou_threshold].append(i)
        found: list[Detections | None] = [None] * len(images)
        for (conf, iou), members in groups.items():
            (selected,) = self.nms.run(
                None,
                {
                    "boxes": boxes[members],
                    "scores": scores[members],
                    "max_per_class": np.array([self._boxes], dtype=np.int64),
                    "iou_threshold": np.array([iou], dtype=np.float32),
                    "score_threshold": np.array([conf], dtype=np.float32),
                },
            )
            for k, i in enumerate(members):
                rows = selected[selected[:, 0] == k]
                labels, box_idx = rows[:, 1], rows[:, 2]
                kept_scores = scores[i, labels, box_idx]
                order = np.argsort(-kept_scores, kind="stable")
                found[i] = _to_detections(
                    boxes[i, box_idx[order]], kept_scores[order], labels[order]
                )
        return found  # type: ignore[return-value]


def resolve_device(name: str) -> str:
    """``"auto"`` -> "cuda" when PyTorch sees a CUDA GPU, else "cpu"; other names unchanged.

    PyTorch is asked only where an NVIDIA GPU could be (a /dev/nvidia* node on Linux), so a
    CPU-only machine decides without importing it.
    """
    if name != "auto":
        return name
    if sys.platform.startswith("linux") and not any(Path("/dev").glob("nvidia[0-9]*")):
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_backend_name(name: str, device: str) -> str:
    """Map ``name`` ("auto", "torch" or "onnxruntime") to the concrete backend for ``device``."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name != "auto":
        return name
    # The one place "auto" is decided. On the CPU ONNX Runtime beats eager PyTorch: at 448 px,
    # batch 8, 2 threads, 32 vs 13 img/s for yolov1-tiny and 3.7 vs 2.6 for yolov1. On CUDA,
    # eager PyTorch with cuDNN (fp16 optional) needs no onnxruntime-gpu; not yet measured.
    return "onnxruntime" if device == "cpu" else "torch"


def resolve_precision(
    name: str, backend: str, device: str, metadata: dict[str, Any], settings: QuantizeSettings
) -> str:
    """Map ``name`` ("auto", "fp32" or "int8") to the precision served.

    ``"auto"`` is "int8" only for ONNX Runtime on the CPU, and only when the checkpoint records
    that the int8 engine built with these ``settings`` passed the accuracy gate and was the
    faster (``int8.default``, written by ``python -m benchmarks.quantize --record``); otherwise
    "fp32" (on CUDA, float16 stays the ``half`` setting's business).
    """
    if name not in PRECISION_NAMES:
        raise ValueError(f"precision must be one of {PRECISION_NAMES}, got {name!r}")
    if name != "auto":
        return name
    record = metadata.get("int8") or {}
    chosen = record.get("default") is True and record.get("settings") == asdict(settings)
    return "int8" if chosen and backend == "onnxruntime" and device == "cpu" else "fp32"


def create_backend(
    name: BackendName | str,
    weights_path: str | Path,
    metadata: dict[str, Any],
    device: str,
    half: bool = False,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    sha256: str | None = None,
    lanes: int | None = None,
    precision: str = "fp32",
    calibration_data: Sequence[str | Path] = (),
    quantize: QuantizeSettings = QuantizeSettings(),
) -> Backend:
    """Build the backend called ``name`` for the checkpoint ``weights_path`` (``metadata``).

    ``half`` (fp16) needs the torch backend on CUDA. For onnxruntime the export is cached by the
    weights file's content (see ``model.export.ensure_onnx``); a cached file that ONNX Runtime
    cannot use is exported again once. ``threads`` defaults to ``default_threads()``;
    ``sha256`` is the weights' hex digest when the caller already computed it; ``lanes``
    (concurrent batches, ONNX Runtime only) defaults to ``default_lanes``. ``precision``
    (see ``resolve_precision``) "int8" serves the int8 engine of ``model.quantize``, needs
    ONNX Runtime on the CPU, and is calibrated (once, then cached) on ``calibration_data``,
    by default the training folders the checkpoint records.
    """
    resolved = resolve_backend_name(name, device)
    asked = precision
    precision = resolve_precision(precision, resolved, device, metadata, quantize)
    if precision == "int8" and (resolved != "onnxruntime" or device != "cpu" or half):
        raise ValueError(
            f"int8 needs the onnxruntime backend on the CPU without half, got {resolved!r} on "
            f"{device}{' with half' if half else ''}"
        )
    for what, value in (("threads", threads), ("lanes", lanes)):
        if value is not None and value < 1:  # before anything is exported
            raise ValueError(f"{what} must be >= 1, got {value}")
    if resolved == "torch":
        from model.checkpoint import load_checkpoint

        model, _ = load_checkpoint(weights_path)  # on the CPU; the backend places it
        backend: Backend = TorchBackend(model, device, half)
        if lanes is not None and lanes > 1:
            logger.warning("the torch backend runs one batch at a time; lanes=%d ignored", lanes)
    else:
        if half:
            raise ValueError(
                f"half precision needs the torch backend on CUDA, got {name!r} on {device}"
            )
        data = list(calibration_data) or training_data(metadata)
        if precision == "int8" and asked == "auto":
            try:  # chosen, not asked for: without an engine or the data to make one, float32
                ensure_int8(weights_path, data, quantize, cache_dir, sha256=sha256)
            except (ValueError, RuntimeError, OSError) as exc:
                logger.warning("serving float32, not the recorded int8 default: %s", exc)
                precision = "fp32"
        if precision == "int8":

            def engine(replace: bool) -> Path:
                return ensure_int8(
                    weights_path, data, quantize, cache_dir, replace=replace, sha256=sha256
                )

            dtype = "int8"
        else:

            def engine(replace: bool) -> Path:
                return ensure_onnx(weights_path, cache_dir, replace=replace, sha256=sha256)

            dtype = "float32"
        path = engine(replace=False)
        try:
            backend = OnnxRuntimeBackend(path, metadata, device, threads, lanes, dtype)
        except Exception as exc:  # truncated, foreign, or an older layout: write it again
            logger.warning("cannot use the ONNX file %s (%s); writing it again", path, exc)
            path = engine(replace=True)
            backend = OnnxRuntimeBackend(path, metadata, device, threads, lanes, dtype)
    logger.info(
        "backend %s (asked for %r) on %s, %s", resolved, name, backend.device, backend.dtype
    )
    return backend
