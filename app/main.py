"""The FastAPI app (``create_app`` + lifespan) and the ``yolov1-serve`` entry point (``run``).

``uvicorn app.main:app`` builds the app from the environment on first access of ``app``;
``yolov1-serve`` (``python -m app.main``) adds the weights check before anything starts and a
SIGTERM that drains (readiness and new requests answer 503 while admitted requests finish).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Route

from app.batcher import BatcherStopped, BatchFailed, QueueFull
from app.docs import mount_docs
from app.inference import CorruptImage, ImageTooLarge, UnsupportedImage
from app.metrics import Metrics
from app.middleware import BodyLimitMiddleware, OneLineStartupFailure, RequestMetricsMiddleware
from app.openapi import DETECTION_UPLOADS, complete_schema
from app.routes import detect, health, model
from app.routes import metrics as metrics_route
from app.service import ClientDisconnected, DeadlineExceeded, Service, StartupError, Unavailable
from app.settings import Settings, default_batch_size
from model.metadata import CheckpointError, read_metadata

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers on top of the files

# Service exceptions -> (HTTP status, rejection reason for the metrics; None: not a rejection).
ERROR_STATUS: dict[type[Exception], tuple[int, str | None]] = {
    CorruptImage: (400, "bad_image"),
    ImageTooLarge: (413, "too_large"),
    UnsupportedImage: (415, "unsupported_media_type"),
    QueueFull: (503, "queue_full"),
    BatcherStopped: (503, "draining"),
    Unavailable: (503, "not_ready"),  # or "draining": the exception says which
    DeadlineExceeded: (504, "deadline"),
    ClientDisconnected: (499, "disconnected"),  # nginx's code; nobody is left to read it
    BatchFailed: (500, None),
}
HTTP_REJECTIONS = {401: "unauthorized", 413: "too_large", 422: "invalid"}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Service = app.state.service
    try:
        await service.start()
    except StartupError as exc:
        app.state.startup_error = str(exc)
        raise
    try:
        yield
    finally:
        await service.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing heavy happens until the lifespan starts."""
    settings = settings if settings is not None else Settings()
    # Histogram buckets up to the largest batch this configuration can run (CUDA's default is
    # the larger; the device is known only at startup).
    metrics = Metrics(settings.max_batch_size or default_batch_size("cuda"))
    app = FastAPI(
        title="YOLOv1 detection service",
        version=_package_version(),
        summary="Micro-batched YOLOv1 object detection over HTTP.",
        lifespan=lifespan,
        # Operation ids (and generated clients' function names) are the handlers' names.
        generate_unique_id_function=lambda route: route.name,
        docs_url=None,  # mount_docs serves both pages from local files, not a CDN
        redoc_url=None,
    )
    mount_docs(app)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = Service(settings, metrics)
    app.state.startup_error = None
    routers = (detect.router, model.router, health.router, metrics_route.router)
    for router in routers:
        app.include_router(router)
    paths = [r.path for r in app.routes if isinstance(r, Route)]  # the docs
    paths += [r.path for router in routers for r in router.routes if isinstance(r, Route)]

    single = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    batch = settings.max_images_per_request * settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    app.add_middleware(OneLineStartupFailure, startup_error=lambda: app.state.startup_error)
    app.add_middleware(
        BodyLimitMiddleware,
        limits={
            path: batch if field == "images" else single
            for path, field in DETECTION_UPLOADS.items()
        },
        on_reject=lambda: metrics.reject("too_large"),
    )
    app.add_middleware(  # outermost: sees every answer
        RequestMetricsMiddleware, metrics=metrics, routes=paths
    )

    for error in ERROR_STATUS:
        app.add_exception_handler(error, _service_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.openapi = functools.partial(_openapi, app, app.openapi)  # type: ignore[method-assign]
    return app


def _package_version() -> str:
    try:
        return version("yolov1-service")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    status, reason = next(v for t, v in ERROR_STATUS.items() if isinstance(exc, t))
    if isinstance(exc, Unavailable):
        reason = exc.reason
    if reason is not None:
        request.app.state.metrics.reject(reason)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if reason := HTTP_REJECTIONS.get(exc.status_code):
        request.app.state.metrics.reject(reason)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    request.app.state.metrics.reject("invalid")
    return await request_validation_exception_handler(request, exc)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises the exception after this answer, so the server logs the traceback.
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def _openapi(app: FastAPI, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if app.openapi_schema is None:  # build() caches its result there
        settings: Settings = app.state.settings
        complete_schema(
            build(), settings.max_images_per_request, bool(settings.api_keys), settings.server_url
        )
    return app.openapi_schema


@functools.cache
def _default_app() -> FastAPI:
    try:
        return create_app()
    except ValidationError as exc:
        raise SystemExit(f"yolov1-serve: {settings_error(exc)}") from None


def __getattr__(name: str) -> Any:
    # ``uvicorn app.main:app`` reads the settings when it asks for ``app``, not at import.
    if name == "app":
        return _default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def settings_error(exc: ValidationError) -> str:
    """A settings ``ValidationError`` in one line, naming the environment variables."""
    parts = []
    for error in exc.errors():
        field = "_".join(str(part) for part in error["loc"]).upper()
        parts.append(f"YOLOV1_{field}: {error['msg']}" if field else error["msg"])
    return "invalid settings: " + "; ".join(parts)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM drains the service before it stops.

    Plain uvicorn closes the listening socket at once (probes and clients see refused
    connections, not 503) and re-raises SIGTERM on exit (status -15). Here the first SIGTERM
    marks the service draining (readiness and new detections answer 503 at once), waits up to
    ``drain_timeout_s`` for admitted requests, then lets uvicorn shut down and exit 0. A second
    SIGTERM, or SIGINT, stops at once as in uvicorn.
    """

    def __init__(self, config: uvicorn.Config, service: Service, drain_timeout_s: float):
        super().__init__(config)
        self.service = service
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._drain_requested or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._drain_requested = True
        self.service.begin_drain()  # a flag: safe inside a signal handler
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        logger.info("SIGTERM: draining (at most %g s)", self.drain_timeout_s)
        await self.service.drain(self.drain_timeout_s)
        self.should_exit = True


def run() -> None:
    """``yolov1-serve``: check the settings and the weights, then serve with one worker."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:     %(name)s: %(message)s")
    for ours in ("app", "model"):  # INFO from the project; only warnings from libraries
        logging.getLogger(ours).setLevel(logging.INFO)
    try:
        settings = Settings()
        read_metadata(settings.weights)  # fail before uvicorn starts: one line, no traceback
    except ValidationError as exc:
        sys.exit(f"yolov1-serve: {settings_error(exc)}")
    except CheckpointError as exc:
        sys.exit(f"yolov1-serve: cannot load weights: {exc}")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        lifespan="on",
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
    )
    service: Service = app.state.service
    DrainingServer(config, service, settings.drain_timeout_s).run()
    if service.batcher is not None and service.batcher.busy:
        # The grace period ended inside a batch, whose clients got a 503. The interpreter would
        # join the inference thread at exit and wait for the batch, however long it takes.
        logger.warning("exiting with a batch still running: the drain timeout passed")
        logging.shutdown()
        os._exit(0)


if __name__ == "__main__":
    run()
