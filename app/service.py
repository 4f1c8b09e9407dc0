"""The running service: the detector behind its batcher, admission, deadlines and draining.

One request's path: ``admit`` (ready? room in the queue?) -> decode in the thread pool ->
``Batcher.submit`` -> wait for the futures, the deadline or the client leaving -> JSON.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

from PIL import Image

from app.backends import resolve_device
from app.batcher import Batcher, Done, QueueFull
from app.inference import (
    DecodedImage,
    Detections,
    DetectOptions,
    Detector,
    Job,
    decode_image,
    draw_detections,
    to_pixels,
)
from app.metrics import Metrics
from app.schemas import Box, Detection, DetectionResult, ImageSize, ModelRef, Timing
from app.settings import FALLBACK_CONF_THRESHOLD, Settings
from model.quantize import QuantizeSettings

logger = logging.getLogger(__name__)


MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter, as MALLOC_ARENA_MAX sets it


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for threads that allocate from now on; True if it took effect.

    glibc gives each thread that allocates its own heap (up to 8 per core), and each keeps the
    image buffers its thread freed. Capped at 2, the tiny model's peak RSS under load went from
    562 to 454 MB at the same throughput (benchmarks/serving.py). An operator's
    MALLOC_ARENA_MAX wins; off glibc (musl, macOS) nothing happens.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


class StartupError(RuntimeError):
    """The service cannot start; the message is one line meant for the operator."""


class Unavailable(Exception):
    """Not serving detections right now (``reason``: ``not_ready`` or ``draining``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class DeadlineExceeded(Exception):
    """The request's deadline passed before its answer was ready."""


class ClientDisconnected(Exception):
    """The client went away while its request waited."""


class Service:
    """Owns the detector, the batcher and the decode pool; knows if it is ready or draining."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.detector: Detector | None = None
        self.batcher: Batcher[Job, Detections] | None = None
        self.draining = False
        self._in_flight = 0
        self._decoding = 0  # images admitted and not yet queued: they hold queue slots too
        self._idle = asyncio.Event()
        self._idle.set()
        self._decode_pool: ThreadPoolExecutor | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the weights, warm up, start the batcher; raise ``StartupError`` on failure."""
        s = self.settings
        limit_malloc_arenas()  # before the decode pool and the inference thread first allocate
        try:
            device = resolve_device(s.device)
            half = s.half and device.startswith("cuda")
            if s.half and not half:
                logger.warning("YOLOV1_HALF is ignored on %s: fp16 needs CUDA", device)
            detector = await asyncio.to_thread(
                Detector.load, s.weights, device, s.backend, half, s.inference_lanes,
                s.precision, s.calibration_data, QuantizeSettings(images=s.calibration_images),
            )  # fmt: skip
            await asyncio.to_thread(detector.warm_up)
        except Exception as exc:
            logger.debug("startup failed", exc_info=True)
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StartupError(f"cannot start: {message}") from exc
        # PIL's own decompression-bomb guard refuses, as it opens them, images far over its
        # limit; decode_image checks ours first. Raise PIL's if needed, so it never refuses
        # what we accept (it is process-wide, hence never lowered).
        if Image.MAX_IMAGE_PIXELS is not None and s.max_image_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = s.max_image_pixels
        self.detector = detector
        self._decode_pool = ThreadPoolExecutor(s.decode_workers, thread_name_prefix="decode")
        self.batcher = Batcher(
            detector,
            s.batch_size_for(detector.backend.device),
            s.max_wait_ms / 1000,
            s.max_queue,
            self.metrics.observe_batch,
            incoming=lambda: self._decoding,
            lanes=detector.backend.lanes,
            run_lane=partial(detector, concurrent=True),
        )
        self.metrics.queue_depth.set_function(lambda: self.batcher.queue_depth)
        self.batcher.start()
        logger.info(
            "ready: %s (version %s) on %s via %s, %s, %d lane(s); API keys %s",
            s.weights.name, detector.version, detector.backend.device, detector.backend.name,
            detector.backend.dtype, detector.backend.lanes,
            f"on ({len(s.api_keys)})" if s.api_keys else "off",
        )  # fmt: skip

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.running and not self.draining

    def begin_drain(self) -> None:
        """Refuse new detections from now on; safe to call from a signal handler."""
        self.draining = True

    async def drain(self, timeout_s: float) -> None:
        """Refuse new detections and wait (at most ``timeout_s``) for admitted ones to finish.

        Those still unanswered after ``timeout_s`` get a 503 (``BatcherStopped``) at once, so
        that each client has its answer before the server closes the connections.
        """
        self.begin_drain()
        if self._in_flight:
            logger.info("draining: waiting for %d admitted requests", self._in_flight)
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                logger.warning("drain timeout: refusing the %d requests left", self._in_flight)
                if self.batcher is not None:
                    await self.batcher.stop(timeout_s=0)

    async def stop(self) -> None:
        await self.drain(self.settings.drain_timeout_s)
        if self.batcher is not None:
            await self.batcher.stop()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)

    # ---- requests -----------------------------------------------------------------------

    def options(
        self,
        confidence: float | None,
        iou: float | None,
        max_detections: int,
        class_names: Sequence[str] | None,
    ) -> DetectOptions:
        """Request parameters with the settings' defaults; ``ValueError`` names unknown classes."""
        class_ids = None
        class_names = [name for name in class_names or () if name]  # "?classes=": no filter
        if class_names:
            known = self.loaded_detector().class_names
            unknown = sorted(set(class_names) - set(known))
            if unknown:
                raise ValueError(f"unknown class names {unknown}; known: {known}")
            class_ids = frozenset(known.index(name) for name in class_names)
        return DetectOptions(
            self.default_conf_threshold if confidence is None else confidence,
            self.settings.iou_threshold if iou is None else iou,
            max_detections,
            class_ids,
        )

    @property
    def default_conf_threshold(self) -> float:
        """YOLOV1_CONF_THRESHOLD when set, else the checkpoint's calibrated threshold."""
        if self.settings.conf_threshold is not None:
            return self.settings.conf_threshold
        calibrated = self.loaded_detector().metadata.get("conf_threshold")
        return FALLBACK_CONF_THRESHOLD if calibrated is None else float(calibrated)

    def loaded_detector(self) -> Detector:
        if self.detector is None:
            raise Unavailable("not_ready", "the model is still loading")
        return self.detector

    async def detect(
        self,
        uploads: Sequence[bytes],
        options: DetectOptions,
        disconnected: Callable[[], Awaitable[object]],
    ) -> list[DetectionResult]:
        """Detect objects in each upload; answers come in upload order.

        Raises ``Unavailable`` or ``QueueFull`` (retry later), an ``ImageError`` for a bad
        upload, ``DeadlineExceeded``, ``ClientDisconnected`` when ``disconnected()`` returns
        first, or ``BatchFailed``.
        """
        async with self._admitted(len(uploads)):
            results = await self._detect(uploads, options, disconnected, keep_image=False)
        return [response for response, _ in results]

    async def render(
        self,
        upload: bytes,
        options: DetectOptions,
        disconnected: Callable[[], Awaitable[object]],
    ) -> bytes:
        """Detect objects in ``upload`` and return it as a JPEG with the boxes drawn."""
        async with self._admitted(1):
            [(response, image)] = await self._detect([upload], options, disconnected, True)
            boxes = [(d.box.x1, d.box.y1, d.box.x2, d.box.y2) for d in response.detections]
            labels = [f"{d.label} {d.confidence:.2f}" for d in response.detections]
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._decode_pool, draw_detections, image, boxes, labels
            )

    @asynccontextmanager
    async def _admitted(self, n_images: int) -> AsyncIterator[None]:
        """Admit a request (or refuse it with a 503 reason) and count it until it is answered."""
        self._admit(n_images)
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _detect(
        self,
        uploads: Sequence[bytes],
        options: DetectOptions,
        disconnected: Callable[[], Awaitable[object]],
        keep_image: bool,
    ) -> list[tuple[DetectionResult, Image.Image | None]]:
        started = time.monotonic()
        decode = self._decoder(keep_image)
        loop = asyncio.get_running_loop()
        self._decoding += len(uploads)  # no await since _admit counted them: still in bounds
        try:
            decoded = await asyncio.gather(
                *(loop.run_in_executor(self._decode_pool, decode, data) for data in uploads),
                return_exceptions=True,  # let every decode finish; report the first bad upload
            )
            if errors := [e for e in decoded if isinstance(e, BaseException)]:
                raise errors[0]
            images: list[DecodedImage] = decoded
            futures = self.batcher.submit([Job(image.pixels, options) for image in images])
        finally:
            self._decoding -= len(uploads)
        deadline = started + self.settings.request_timeout_s
        done = await self._wait(futures, deadline, disconnected)
        total_ms = (time.monotonic() - started) * 1000
        return [
            (self._response(image, result, total_ms), image.image)
            for image, result in zip(images, done, strict=True)
        ]

    def _decoder(self, keep_image: bool) -> Callable[[bytes], DecodedImage]:
        """``decode_image`` for this detector: on a CUDA backend JPEGs are decoded on its GPU."""
        device = self.detector.backend.device
        return partial(
            decode_image,
            size=self.detector.image_size,
            max_pixels=self.settings.max_image_pixels,
            keep_image=keep_image,
            device=device if device.startswith("cuda") else None,
        )

    def _admit(self, n_images: int) -> None:
        """Refuse before anything is decoded when the answer would be a 503 anyway.

        Images being decoded count against ``max_queue`` with the queued ones, so a burst is
        refused at once instead of being decoded and then refused.
        """
        if self.draining:
            raise Unavailable("draining", "service is draining for shutdown")
        if not self.ready:
            raise Unavailable("not_ready", "the model is still loading")
        if not self.batcher.has_room(self._decoding + n_images):
            raise QueueFull("queue is full, retry later")

    async def _wait(
        self,
        futures: list[asyncio.Future[Done]],
        deadline: float,
        disconnected: Callable[[], Awaitable[object]],
    ) -> list[Done]:
        gathered = asyncio.gather(*futures)
        gone = asyncio.ensure_future(disconnected())
        try:
            finished, _ = await asyncio.wait(
                {gathered, gone},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if gathered in finished:
                return gathered.result()
            if gone in finished:
                raise ClientDisconnected("the client disconnected before its answer")
            raise DeadlineExceeded(
                f"deadline of {self.settings.request_timeout_s:g} s passed before the answer"
            )
        finally:
            gone.cancel()
            if gone.done() and not gone.cancelled():
                gone.exception()  # a broken connection counts as gone; nothing to report
            for future in futures:
                if not future.cancel() and not future.cancelled():
                    future.exception()  # mark a second failure in a batch as seen
            if not gathered.done():
                gathered.cancel()

    def _response(self, image: DecodedImage, result: Done, total_ms: float) -> DetectionResult:
        found: Detections = result.value
        boxes = to_pixels(found.boxes, image.width, image.height).tolist()
        names = self.detector.class_names
        detections = [
            Detection(
                class_id=label,
                label=names[label],
                confidence=score,
                box=Box(x1=x1, y1=y1, x2=x2, y2=y2),
            )
            for (x1, y1, x2, y2), score, label in zip(
                boxes, found.scores.tolist(), found.labels.tolist(), strict=True
            )
        ]
        return DetectionResult(
            model=ModelRef(name=self.detector.metadata["arch"], version=self.detector.version),
            image=ImageSize(width=image.width, height=image.height),
            detections=detections,
            timing_ms=Timing(
                queue=result.queue_s * 1000, inference=result.run_s * 1000, total=total_ms
            ),
        )
