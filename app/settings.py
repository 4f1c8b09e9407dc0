"""Service settings: one class, read from ``YOLOV1_*`` environment variables, checked at startup."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, HttpUrl, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = PROJECT_ROOT / "weights" / "yolov1-voc.safetensors"
FALLBACK_CONF_THRESHOLD = 0.25  # for a checkpoint that records no calibrated threshold


class Settings(BaseSettings):
    """Everything the service can be told; a bad value stops it before it loads anything."""

    model_config = SettingsConfigDict(env_prefix="YOLOV1_", frozen=True)

    weights: Path = DEFAULT_WEIGHTS
    device: str = "auto"  # auto = CUDA when available, else CPU; or cpu, cuda, cuda:N
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    half: bool = False  # fp16 weights and inputs; CUDA only, ignored (with a warning) on CPU
    # auto: int8 on the CPU (ONNX Runtime) where the checkpoint records that its int8 engine
    # passed the accuracy gate, else fp32 (see app.backends.resolve_precision).
    precision: Literal["auto", "fp32", "int8"] = "auto"
    # Folders (comma-separated) the int8 engine is calibrated on, once; empty: the training
    # data the checkpoint records. A cached engine needs none.
    calibration_data: Annotated[tuple[Path, ...], NoDecode] = ()
    calibration_images: int = Field(32, ge=1, le=10_000)
    # Images per inference batch; None: 4 on the CPU, 16 on CUDA (see default_batch_size).
    max_batch_size: int | None = Field(None, ge=1, le=1024)
    # Batches that may run at once (ONNX Runtime); None: 2 on the CPU for exports up to
    # 128 MiB, else 1 (see app.backends.default_lanes).
    inference_lanes: int | None = Field(None, ge=1, le=64)
    max_images_per_request: int = Field(16, ge=1, le=1024)  # per /v1/detect/batch upload
    # Small, so a lone request is barely delayed; under load batches fill while the worker runs.
    max_wait_ms: float = Field(2.0, ge=0, le=10_000)
    max_queue: int = Field(64, ge=1)  # images admitted but not yet in a running batch
    request_timeout_s: float = Field(30.0, gt=0)
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1)  # per uploaded file
    max_image_pixels: int = Field(40_000_000, ge=1)  # width * height, read from the header
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()  # empty: auth off
    # None: the checkpoint's calibrated threshold (its val best-F1), else FALLBACK_CONF_THRESHOLD.
    conf_threshold: float | None = Field(None, ge=0, le=1)
    iou_threshold: float = Field(0.5, ge=0, le=1)
    drain_timeout_s: float = Field(30.0, ge=0)  # SIGTERM: longest wait for admitted requests
    decode_workers: int = Field(default_factory=lambda: min(4, os.cpu_count() or 1), ge=1)
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    # The URL clients reach the service at, the schema's ``servers`` entry (generated clients'
    # default base URL); None: http://localhost:<port>.
    public_url: HttpUrl | None = None

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("calibration_data", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(Path(part.strip()) for part in value.split(",") if part.strip())
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        # Checked by its form: importing torch to ask it would cost the ONNX Runtime service
        # ~0.8 GB of memory.
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"not 'auto', 'cpu', 'cuda' or 'cuda:N': {value!r}")
        return value

    @model_validator(mode="after")
    def _check_queue(self) -> Settings:
        # A full batch, and a full /v1/detect/batch upload, must fit in an empty queue.
        for name in ("max_batch_size", "max_images_per_request"):
            value = getattr(self, name)
            if value is not None and self.max_queue < value:
                raise ValueError(f"max_queue ({self.max_queue}) must be >= {name} ({value})")
        return self

    @property
    def server_url(self) -> str:
        """``public_url`` without its trailing slash, else http://localhost:<port>."""
        if self.public_url is None:
            return f"http://localhost:{self.port}"
        return str(self.public_url).rstrip("/")

    def batch_size_for(self, device: str) -> int:
        """``max_batch_size`` if set, else the default for ``device`` (see default_batch_size)."""
        return self.max_batch_size or default_batch_size(device)


def default_batch_size(device: str) -> int:
    """Images per inference batch when YOLOV1_MAX_BATCH_SIZE is unset.

    On the CPU (ONNX Runtime, 2 threads) larger batches cost more per image for the tiny
    network, whose activations then outgrow the caches: 4 served 42.6-43.5 images/s at
    concurrency 16 against 37.6 for 16 (two runs each, benchmarks/serving.py's photos); for
    the full network 8 was no faster than 4 (2.8-3.0 images/s either way, two A/B runs). A GPU
    needs batches to be busy.
    """
    return 16 if device.startswith("cuda") else 4
