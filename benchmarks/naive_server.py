"""The per-request server that typical YOLO repos ship, as the baseline for ``benchmarks.serving``.

``python -m benchmarks.naive_server --weights W [--device cpu] [--backend auto] --port P``

The usual pattern: the model is loaded once, and an ``async def`` endpoint decodes the upload
and calls the model on it, one image per call, inside the handler, so each call blocks the
event loop and nothing is batched. The weights, the backend, the decoding (``decode_image``)
and the postprocessing (``Detector``) are the service's own, so the comparison measures the
serving design alone. There are no limits, auth or metrics: it exists to be measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import FastAPI, File, HTTPException, UploadFile

from app.backends import resolve_device
from app.inference import DetectOptions, Detector, ImageError, Job, decode_image, to_pixels
from app.settings import FALLBACK_CONF_THRESHOLD, Settings

_DEFAULTS = Settings.model_fields  # the class's defaults; nothing is read from the environment


# What the service applies to a request without parameters (max_detections: the route's default).
def default_options(detector: Detector) -> DetectOptions:
    """The checkpoint's calibrated confidence, as the service uses when none is set."""
    return DetectOptions(
        conf_threshold=detector.metadata.get("conf_threshold", FALLBACK_CONF_THRESHOLD),
        iou_threshold=_DEFAULTS["iou_threshold"].default,
        max_detections=100,
    )


MAX_IMAGE_PIXELS: int = _DEFAULTS["max_image_pixels"].default


def create_naive_app(detector: Detector) -> FastAPI:
    """``POST /v1/detect`` (multipart ``image``) and ``GET /health/ready``, nothing else."""
    app = FastAPI(title="naive per-request YOLOv1 server")
    names = detector.class_names
    options = default_options(detector)

    @app.post("/v1/detect")
    async def detect(image: Annotated[UploadFile, File()]) -> dict[str, Any]:
        data = await image.read()
        try:
            decoded = decode_image(data, detector.image_size, MAX_IMAGE_PIXELS)
        except ImageError as exc:
            raise HTTPException(400, str(exc)) from None
        [found] = detector([Job(decoded.pixels, options)])  # blocks the event loop
        boxes = to_pixels(found.boxes, decoded.width, decoded.height).tolist()
        return {
            "model": {"name": detector.metadata["arch"], "version": detector.version},
            "image": {"width": decoded.width, "height": decoded.height},
            "detections": [
                {
                    "class_id": label,
                    "label": names[label],
                    "confidence": score,
                    "box": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
                }
                for (x1, y1, x2, y2), score, label in zip(
                    boxes, found.scores.tolist(), found.labels.tolist(), strict=True
                )
            ],
        }

    @app.get("/health/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}  # the model is loaded before the server listens

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        backend = detector.backend
        return {"backend": backend.name, "device": backend.device, "batching": None}

    return app


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="a .safetensors checkpoint")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "int8"))
    parser.add_argument("--calibration-data", nargs="+", type=Path, default=[])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    return parser


def main(args: argparse.Namespace) -> None:
    detector = Detector.load(
        args.weights, resolve_device(args.device), args.backend,
        precision=args.precision, calibration_data=args.calibration_data,
    )  # fmt: skip
    detector.warm_up()
    app = create_naive_app(detector)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
