"""Inference backends: one call from a batch of images to the raw YOLOv1 grid.

Every backend takes (N, 3, H, W) float RGB in [0, 1] (H = W = the model's ``image_size``) and
returns the raw grid (N, S, S, C + 5B) as float32; decoding and NMS happen downstream.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import onnxruntime as ort
import torch

from model.export import INPUT_NAME, OUTPUT_NAME, ensure_onnx
from model.network import YOLOv1, prepare_for_inference

logger = logging.getLogger(__name__)

BackendName = Literal["auto", "torch", "onnxruntime"]
BACKEND_NAMES: tuple[str, ...] = ("auto", "torch", "onnxruntime")


@runtime_checkable
class Backend(Protocol):
    """Runs the network: images (N, 3, H, W) float in [0, 1] -> raw grid (N, S, S, C+5B) float32.

    ``device`` is where inputs are best placed and where the grid comes back; ``dtype`` is the
    precision the network computes in.
    """

    name: str
    device: torch.device
    dtype: torch.dtype

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _check_images(images: torch.Tensor, image_size: int) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, image_size, image_size):
        raise ValueError(
            f"images must have shape (N, 3, {image_size}, {image_size}), got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")


class TorchBackend:
    """Eager PyTorch on a BatchNorm-folded, channels_last copy of the model.

    Images already on ``device`` are used where they are (GPU-decoded uploads); host images
    are copied to a CUDA device through pinned memory.
    """

    name = "torch"

    def __init__(self, model: YOLOv1, device: torch.device | str, half: bool = False):
        self.device = torch.device(device)
        if half and self.device.type != "cuda":
            raise ValueError(f"half precision needs a CUDA device, got {self.device}")
        self.dtype = torch.float16 if half else torch.float32
        self.model = prepare_for_inference(model, self.device, self.dtype)
        S, C, B = model.grid_size, model.num_classes, model.boxes_per_cell
        self._image_size = model.image_size
        self._grid_shape = (S, S, C + 5 * B)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self._image_size)
        if images.shape[0] == 0:  # view(-1, ...) cannot infer N from an empty batch
            return torch.empty((0, *self._grid_shape), device=self.device)
        with torch.inference_mode():
            if images.device.type == "cpu" and self.device.type == "cuda":
                # From pinned memory the copy is asynchronous: the host goes on queueing work.
                images = images.pin_memory().to(self.device, non_blocking=True)
            x = images.to(self.device, self.dtype, memory_format=torch.channels_last)
            return self.model(x).float()  # (N, S, S, C+5B)


class OnnxRuntimeBackend:
    """ONNX Runtime on an export written by ``model.export``; the grid comes back on the CPU."""

    name = "onnxruntime"
    dtype = torch.float32

    def __init__(
        self, onnx_path: str | Path, device: torch.device | str, threads: int | None = None
    ):
        device = torch.device(device)
        threads = torch.get_num_threads() if threads is None else threads
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Measured with benchmarks/serving.py: the arena keeps the largest batch's activations
        # for good (peak 795 -> 531 MB for yolov1-tiny at batch 16, same speed), and spinning
        # idle threads starve the decode pool (c1 p50 87-117 -> 66-69 ms).
        options.enable_cpu_mem_arena = False
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                logger.warning("onnxruntime has no CUDAExecutionProvider; running on the CPU")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        # ONNX Runtime falls back to the CPU when the CUDA libraries fail to load.
        on_cuda = "CUDAExecutionProvider" in self.session.get_providers()
        self.device = device if on_cuda else torch.device("cpu")
        (images,), (grid,) = self.session.get_inputs(), self.session.get_outputs()
        if (images.name, grid.name) != (INPUT_NAME, OUTPUT_NAME) or not all(
            isinstance(d, int) for d in [*images.shape[1:], *grid.shape[1:]]
        ):
            raise ValueError(
                f"{onnx_path} is not a YOLOv1 export: expected {INPUT_NAME} (N, 3, H, W) -> "
                f"{OUTPUT_NAME} (N, S, S, C+5B), got {images.name} {images.shape} -> "
                f"{grid.name} {grid.shape}"
            )
        self._image_size = images.shape[2]
        self._grid_shape = tuple(grid.shape[1:])
        logger.info(
            "onnxruntime session on %s with %d threads", self.session.get_providers(), threads
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self._image_size)
        if images.shape[0] == 0:
            return torch.empty((0, *self._grid_shape))
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (grid,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return torch.from_numpy(grid)  # (N, S, S, C+5B)


def resolve_backend_name(name: str, device: torch.device | str) -> str:
    """Map ``name`` ("auto", "torch" or "onnxruntime") to the concrete backend for ``device``."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name != "auto":
        return name
    # The one place "auto" is decided. On the CPU ONNX Runtime beats eager PyTorch: at 448 px,
    # batch 8, 2 threads, 32 vs 13 img/s for yolov1-tiny and 3.7 vs 2.6 for yolov1. On CUDA,
    # eager PyTorch with cuDNN (fp16 optional) needs no onnxruntime-gpu; not yet measured.
    return "onnxruntime" if torch.device(device).type == "cpu" else "torch"


def create_backend(
    name: BackendName | str,
    model: YOLOv1,
    weights_path: str | Path,
    device: torch.device | str,
    half: bool = False,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> Backend:
    """Build the backend called ``name`` for ``model``, whose weights are ``weights_path``.

    ``half`` (fp16) needs the torch backend on CUDA. For onnxruntime the export is cached by the
    weights file's content (see ``model.export.ensure_onnx``); ``threads`` defaults to torch's.
    """
    device = torch.device(device)
    resolved = resolve_backend_name(name, device)
    if resolved == "torch":
        backend: Backend = TorchBackend(model, device, half)
    else:
        if half:
            raise ValueError(
                f"half precision needs the torch backend on CUDA, got {name!r} on {device}"
            )
        backend = OnnxRuntimeBackend(ensure_onnx(model, weights_path, cache_dir), device, threads)
    logger.info(
        "backend %s (asked for %r) on %s, %s", resolved, name, backend.device, backend.dtype
    )
    return backend
