"""The JSON the service answers with: response models, the error model and their examples."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    name: str = Field(description="Architecture of the served network.", examples=["yolov1"])
    version: str = Field(
        description="First 12 hex digits of the weights file's SHA-256.", examples=["3f2a9c41d0b7"]
    )


class ImageSize(BaseModel):
    width: int = Field(description="Width in pixels, after EXIF orientation.", examples=[768])
    height: int = Field(description="Height in pixels, after EXIF orientation.", examples=[576])


class Box(BaseModel):
    """Corners in pixels of the uploaded image (after EXIF orientation): x right, y down."""

    x1: float = Field(examples=[131.2])
    y1: float = Field(examples=[219.8])
    x2: float = Field(examples=[309.5])
    y2: float = Field(examples=[541.0])


class Detection(BaseModel):
    class_id: int = Field(description="Index into the model's class names.", examples=[11])
    label: str = Field(examples=["dog"])
    confidence: float = Field(ge=0, le=1, examples=[0.87])
    box: Box


class Timing(BaseModel):
    queue: float = Field(description="Milliseconds waiting for a batch.", examples=[1.9])
    inference: float = Field(description="Milliseconds the image's batch ran.", examples=[41.3])
    total: float = Field(description="Milliseconds from admission to the answer.", examples=[52.0])


class DetectionResult(BaseModel):
    model: ModelRef
    image: ImageSize
    detections: list[Detection] = Field(description="Sorted by decreasing confidence.")
    timing_ms: Timing


class BatchDetectionResult(BaseModel):
    results: list[DetectionResult] = Field(description="One result per upload, in upload order.")


class WeightsSource(BaseModel):
    """Where imported weights came from (absent for checkpoints that yolov1-train wrote)."""

    format: str = Field(description="The source format.", examples=["darknet"])
    cfg: str = Field(description="File name of the source cfg.", examples=["yolov1.cfg"])
    cfg_sha256: str = Field(description="SHA-256 of the source cfg.")
    weights: str = Field(
        description="File name of the source weights.", examples=["yolov1.weights"]
    )
    weights_sha256: str = Field(description="SHA-256 of the source weights.")


class BatchingInfo(BaseModel):
    max_batch_size: int = Field(description="Images per inference batch, at most.")
    lanes: int = Field(description="Batches that may run at once.")
    max_images_per_request: int = Field(description="Images per /v1/detect/batch upload.")
    max_wait_ms: float
    max_queue: int
    request_timeout_s: float


class ModelInfo(BaseModel):
    name: str = Field(examples=["yolov1"])
    version: str = Field(examples=["3f2a9c41d0b7"])
    weights: str = Field(description="File name of the served checkpoint.")
    arch: str = Field(examples=["yolov1"])
    grid_size: int = Field(description="S: the image is divided into S x S cells.", examples=[7])
    boxes_per_cell: int = Field(description="B: boxes predicted per cell.", examples=[2])
    num_classes: int = Field(description="C: number of classes.", examples=[20])
    image_size: int = Field(description="Network input side in pixels.", examples=[448])
    class_names: list[str] = Field(description="The names the `classes` parameter accepts.")
    backend: str = Field(examples=["onnxruntime"])
    device: str = Field(examples=["cpu"])
    dtype: str = Field(examples=["float32"])
    precision: str = Field(
        description="What the network computes in: fp32, fp16 or int8.", examples=["fp32"]
    )
    conf_threshold: float = Field(description="Default `confidence` query parameter.")
    iou_threshold: float = Field(description="Default `iou` query parameter.")
    batching: BatchingInfo
    source: WeightsSource | None = Field(
        default=None, description="Where imported weights came from; null for trained ones."
    )


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class ErrorResponse(BaseModel):
    """Every error but 422: what went wrong, in one message."""

    detail: str = Field(examples=["queue is full, retry later"])


class ValidationIssue(BaseModel):
    """One invalid part of a request, as FastAPI (and pydantic) report it."""

    loc: list[str | int] = Field(
        description="Where: the request part, then the field.", examples=[["query", "classes"]]
    )
    msg: str = Field(examples=["unknown class names ['unicorn']; known: ['cat', 'dog']"])
    type: str = Field(description="Error kind, for programs.", examples=["value_error"])
    input: Any = Field(None, description="The value that was refused.")
    ctx: dict[str, Any] | None = Field(None, description="The kind's parameters, if any.")


class ValidationErrorResponse(BaseModel):
    """422: every invalid part of the request."""

    detail: list[ValidationIssue]


def _error(
    description: str,
    example: str | list[dict[str, Any]],
    headers: dict[str, Any] | None = None,
    model: type[BaseModel] = ErrorResponse,
) -> dict:
    response: dict[str, Any] = {
        "model": model,
        "description": description,
        "content": {"application/json": {"example": {"detail": example}}},
    }
    if headers:
        response["headers"] = headers
    return response


RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}

UNAUTHORIZED = {
    401: _error(
        "Missing or wrong API key (`X-API-Key` or `Authorization: Bearer`).",
        "invalid or missing API key",
    )
}
NOT_READY = {
    503: _error(
        "Not ready: loading, draining for shutdown, or the queue is full.",
        "service is draining for shutdown",
        RETRY_AFTER_HEADER,
    )
}
DETECTION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Unreadable or corrupt image, or a malformed body.", "cannot decode the image"),
    **UNAUTHORIZED,
    413: _error(
        "Upload over the byte limit, or image over the pixel limit (checked from its header).",
        "image is 100000x100000 = 10000000000 pixels; the limit is 40000000",
    ),
    415: _error("Not a JPEG, PNG, WebP or BMP image.", "not a JPEG, PNG, WebP or BMP image"),
    422: _error("Invalid parameters (unknown class name, out-of-range value, missing file).",
                [{"loc": ["query", "classes"], "msg": "unknown class names ['unicorn']; known: "
                  "['cat', 'dog']", "type": "value_error", "input": ["unicorn"]}],
                model=ValidationErrorResponse),
    500: _error("The batch holding this image failed; other requests are unaffected.",
                "inference failed for this batch (RuntimeError)"),
    **NOT_READY,
    504: _error("The request's deadline passed before its batch ran.", "deadline of 30 s passed"),
}  # fmt: skip
