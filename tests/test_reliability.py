"""Hostile and heavy traffic: contract and image fuzzing, overload, faults, shutdown and auth.

tests/test_service*.py already prove each error code from one request, the in-process burst
over the queue limit, the deadline, a client leaving while queued, draining on SIGTERM and the
startup faults of ``yolov1-serve``. This module adds what they do not: schemathesis against a
live server, a corpus of hostile and odd images through the endpoint, a burst four times the
queue limit over real HTTP with the queue sampled, a failing batch among concurrent ones, the
grace period ending inside a batch, a pickle behind ``uvicorn app.main:app``, and the model
route under auth.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
import schemathesis
import torch
from builders import EXIF_STORE, encode, quadrant
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.specs.openapi.media_types import unregister_all

from app.backends import detections_from_grid
from app.batcher import Batcher, BatcherStopped
from app.inference import Detections, DetectOptions
from benchmarks.serving import free_port, read_peak_rss, read_rss_parts, reset_peak_rss
from benchmarks.soak import png_declaring
from model import VOC_CLASSES, encode_targets

REPO = Path(__file__).resolve().parents[1]
API_KEY = "reliability-key"
DOG = VOC_CLASSES.index("dog")

# ---- helpers ----------------------------------------------------------------------------------


def upload(data: bytes, filename: str = "x.jpg", content_type: str = "image/jpeg") -> dict:
    return {"image": (filename, data, content_type)}


def metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """A sample's value from Prometheus text; ``default`` when absent (else ``KeyError``)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    if default is None:
        raise KeyError(f"{name}{labels} not in the metrics")
    return default


class BrightBoxBackend:
    """Stands in for the network: one dog, score 1, on the bright pixels of each input image.

    Its boxes follow the image content, so a response's box shows what the network was given.
    ``fail_on`` holds the (1-based) calls that raise, as a broken GPU would.
    """

    name, device, dtype, lanes = "fake", "cpu", "float32", 1

    def __init__(self, S: int = 2, B: int = 2, C: int = 20, fail_on: frozenset[int] = frozenset()):
        self.S, self.B, self.C = S, B, C
        self.fail_on = fail_on
        self.calls = 0

    def detect(
        self, images: list[np.ndarray], options: list[DetectOptions], concurrent: bool = False
    ) -> list[Detections]:
        grid = self.forward(torch.from_numpy(np.stack(images)))
        return detections_from_grid(grid, options, self.B, self.C)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [0, 1]
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        S, B, C = self.S, self.B, self.C
        grids = torch.zeros(images.shape[0], S, S, C + 5 * B)  # (N, S, S, C+5B)
        height, width = images.shape[2:]
        for grid, image in zip(grids, images, strict=True):
            ys, xs = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
            if len(xs) == 0:
                continue
            edges = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # pixel edges, xyxy
            box_xyxy = torch.stack(edges)[None] / torch.tensor([width, height] * 2)  # (1, 4)
            target = encode_targets(box_xyxy, torch.tensor([DOG]), S, C)  # (S, S, C+5)
            grid[..., : C + 5] = target
            grid[..., C + 3 : C + 5] = target[..., C + 3 : C + 5].sqrt()  # the net gives sqrt(w, h)
        return grids


def bright_box(app, **kw) -> BrightBoxBackend:
    backend = BrightBoxBackend(**kw)
    app.state.service.detector.backend = backend
    return backend


# ---- a live server ----------------------------------------------------------------------------

# yolov1-serve whose inference worker, once ``armed`` exists, waits inside its batch until
# ``release`` exists: the test holds it from outside the process.
HOLDABLE_SERVER = """
import sys, time
from pathlib import Path
import app.inference
armed, entered, release = (Path(p) for p in sys.argv[1:4])
forward = app.inference.Detector.__call__
def held(self, jobs, **kw):
    if armed.exists():
        entered.touch()
        while not release.exists():
            time.sleep(0.01)
    return forward(self, jobs, **kw)
app.inference.Detector.__call__ = held
from app.main import run
run()
"""


class LiveServer:
    """``yolov1-serve`` (SIGTERM draining included) in a subprocess on a loopback port."""

    def __init__(self, weights: Path, workdir: Path, **settings: object):
        self.workdir = workdir
        self.armed, self.entered = workdir / "armed", workdir / "entered"
        self.release_file = workdir / "release"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("YOLOV1_")}
        env.update(
            YOLOV1_WEIGHTS=str(weights), YOLOV1_BACKEND="torch", YOLOV1_HOST="127.0.0.1",
            YOLOV1_PORT=str(port), PYTHONPATH=str(REPO),
        )  # fmt: skip
        env.update({f"YOLOV1_{k.upper()}": str(v) for k, v in settings.items()})
        self.log_path = workdir / "stderr.log"
        command = [sys.executable, "-c", HOLDABLE_SERVER, str(self.armed), str(self.entered),
                   str(self.release_file)]  # fmt: skip
        with self.log_path.open("w") as stderr:  # the child keeps its own copy
            self.process = subprocess.Popen(
                command, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=stderr
            )

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:  # polling another process: nothing to wait on
                assert self.process.poll() is None, f"the server exited:\n{self.log()}"
                try:
                    if client.get("/health/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise AssertionError(f"the server was not ready after {timeout_s} s:\n{self.log()}")

    def hold(self) -> None:
        """Hold the next batch inside the worker until ``release()``."""
        self.entered.unlink(missing_ok=True)
        self.release_file.unlink(missing_ok=True)
        self.armed.touch()

    def release(self) -> None:
        self.armed.unlink(missing_ok=True)
        self.release_file.touch()

    async def wait_held(self, timeout_s: float = 30) -> None:
        await poll(self.entered.exists, timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, then the exit status (killed if it does not exit in ``timeout_s``)."""
        self.release()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


async def poll(condition, timeout_s: float) -> None:
    """Poll another process's state (there is no event to wait on), failing after the timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


MAX_BATCH, MAX_QUEUE = 4, 8


@pytest.fixture(scope="module")
def live(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the fuzzing and the overload tests; it must still exit 0 at the end."""
    server = LiveServer(
        weights, tmp_path_factory.mktemp("live"),
        max_batch_size=MAX_BATCH, max_images_per_request=MAX_BATCH, max_queue=MAX_QUEUE,
        api_keys=API_KEY,
    )  # fmt: skip
    try:
        server.wait_ready()
        yield server
    finally:
        alive = server.process.poll() is None
        status = server.stop()
    assert alive, f"the server died during the module:\n{server.log()}"
    assert status == 0 and "Traceback" not in server.log(), server.log()


# ---- contract fuzzing -----------------------------------------------------------------------

FUZZ_EXAMPLES = 40  # per operation and mode: about 350 requests, a few seconds on loopback
SAMPLE_IMAGES = {  # real files per accepted media type, for schema-valid uploads
    "image/jpeg": encode(quadrant(64, 48), "JPEG"),
    "image/png": encode(quadrant(48, 64).convert("P"), "PNG"),
    "image/webp": encode(quadrant(40, 40), "WEBP"),
    "image/bmp": encode(quadrant(30, 20), "BMP"),
}
PARAMETERISED = ["POST /v1/detect", "POST /v1/detect/batch", "POST /v1/detect/render",
                 "GET /v1/model"]  # fmt: skip
PARAMETERLESS = ["GET /health/live", "GET /health/ready", "GET /metrics"]


@pytest.fixture(scope="module")
def contract(live: LiveServer) -> Iterator[schemathesis.BaseSchema]:
    # The upload fields are binary strings, so by default schemathesis sends random bytes as
    # "schema-valid" images, which the service rightly refuses with 415 or 400, and its check
    # "schema-valid request rejected" (ST202) would fail on that. Registering real images for
    # the media types the schema's multipart encoding names keeps the check on: valid
    # requests must now get a 200. Random bytes still come with negative cases and the corpus
    # below.
    for media_type, data in SAMPLE_IMAGES.items():
        schemathesis.openapi.media_type(media_type, st.just(data))
    try:
        yield schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    finally:
        unregister_all()  # the registry is global; leave it as the other modules expect


def test_every_route_is_fuzzed(contract):
    labels = {result.ok().label for result in contract.get_all_operations()}
    assert labels == set(PARAMETERISED + PARAMETERLESS)


def mutated_parameters(case) -> set[str]:
    """The parameters a negative case made invalid (schemathesis's own record of it)."""
    data = case.meta.phase.data
    names = {data.parameter} | {m.parameter for m in data.mutations}
    return {name for name in names if name}


@pytest.mark.parametrize(
    ("label", "mode"),
    [(label, mode) for label in PARAMETERISED for mode in ("positive", "negative")]
    + [(label, "positive") for label in PARAMETERLESS],  # nothing to mutate: no negative cases
)
def test_fuzzed_requests_get_documented_answers(contract, live, label, mode):
    """No 5xx, every status documented, every body and header as the schema says."""
    operation = contract.find_operation_by_label(label)
    path = label.split()[1]
    auth = {"X-API-Key": API_KEY}
    statuses: Counter[int] = Counter()
    session = requests.Session()

    def refused_probes() -> float:
        text = httpx.get(f"{live.url}/metrics").text
        return metric(text, "yolov1_requests_total", route=path, status="401", default=0)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)),
           copies=st.integers(1, MAX_BATCH),
           names=st.lists(st.sampled_from(VOC_CLASSES), max_size=3))  # fmt: skip
    def fuzz(case, copies, names):
        if mode == "positive" and case.query and case.query.get("classes"):
            # Any string is schema-valid (the schema is the same for every checkpoint), but only
            # the served class names are valid: an unknown one is a 422 naming them.
            case.query["classes"] = names
        if mode == "negative" and mutated_parameters(case) == {"classes"}:
            # Any value of `classes` reaches the server as query strings, which the schema
            # allows (a list of strings; "?classes=" means no filter, names are checked against
            # the served classes): alone, its mutation is not negative on the wire.
            reject()
        body = case.body if isinstance(case.body, dict) else {}
        if isinstance(body.get("images"), bytes):
            # schemathesis puts the registered image in place of the whole array: send the
            # array of files that the schema describes.
            body["images"] = [body["images"]] * copies
        try:
            response = case.call(headers=auth, session=session, timeout=30)
        except (ValueError, UnicodeError):
            # A generated header value HTTP cannot carry (not latin-1): refused by the client
            # library before anything is sent. A connection error is not caught here.
            reject()
        statuses[response.status_code] += 1
        case.validate_response(
            response, headers=auth, transport_kwargs={"session": session, "headers": auth}
        )

    refused_before = refused_probes()
    fuzz()
    session.close()
    assert statuses, "no request was sent"
    assert max(statuses) < 500, statuses
    if mode == "positive":  # valid requests reach the model, not just the validators
        assert set(statuses) == {200}, statuses
    if label in PARAMETERISED and statuses[200]:
        # After each 200, schemathesis's ignored_auth check sent the request again without a
        # key and with wrong ones; the check passed, so the server refused them.
        assert refused_probes() - refused_before >= statuses[200]


def test_an_empty_classes_value_is_documented_and_filters_nothing(live):
    """Regression (found by the fuzzing above): the service takes ``?classes=`` as no filter,
    while the schema's enum (since removed) refused the empty name."""
    schema = httpx.get(f"{live.url}/openapi.json").json()
    [classes] = [p for p in schema["paths"]["/v1/detect"]["post"]["parameters"]
                 if p["name"] == "classes"]  # fmt: skip
    assert "all when absent or empty" in classes["description"]
    files, auth = upload(SAMPLE_IMAGES["image/jpeg"]), {"X-API-Key": API_KEY}
    options = {"confidence": 0, "max_detections": 1000}
    empty = httpx.post(f"{live.url}/v1/detect", files=files, headers=auth,
                       params={**options, "classes": ""})  # fmt: skip
    absent = httpx.post(f"{live.url}/v1/detect", files=files, headers=auth, params=options)
    assert empty.status_code == absent.status_code == 200
    assert empty.json()["detections"] == absent.json()["detections"]


# ---- image fuzzing through the endpoint -----------------------------------------------------


def animated(fmt: str) -> bytes:
    """Two frames: the first white at the top left, the second white at the bottom right."""
    first = quadrant(64, 48)
    second = first.transpose(Image.Transpose.ROTATE_180)
    return encode(first, fmt, save_all=True, append_images=[second], duration=100, loop=0)


def sixteen_bit_png() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 80).astype(np.uint16), (60, 1))  # (60, 80)
    return encode(Image.fromarray(ramp), "PNG")


_JPEG, _PNG, _WEBP = (encode(quadrant(300, 200), f) for f in ("JPEG", "PNG", "WEBP"))

# name -> (bytes, filename, content type, status, detail or the (width, height) of a 200)
CORPUS: dict[str, tuple[bytes, str, str, int, str | tuple[int, int]]] = {
    "random-bytes": (np.random.default_rng(0).bytes(4096), "x.jpg", "image/jpeg", 415,
                     "not a JPEG, PNG, WebP or BMP"),
    "truncated-jpeg": (_JPEG[: len(_JPEG) // 2], "x.jpg", "image/jpeg", 400, "cannot"),
    "truncated-png": (_PNG[: len(_PNG) // 2], "x.png", "image/png", 400, "cannot"),
    "truncated-webp": (_WEBP[: len(_WEBP) // 2], "x.webp", "image/webp", 400, "cannot"),
    "empty": (b"", "x.jpg", "image/jpeg", 400, "empty"),
    "bomb-100000x100000": (png_declaring(100_000, 100_000), "x.png", "image/png", 413,
                           "over the limit of 40000000 pixels"),
    "header-only-png": (png_declaring(64, 64), "x.png", "image/png", 400, "cannot decode"),
    "1x1": (encode(Image.new("RGB", (1, 1), (255, 255, 255)), "PNG"), "x.png", "image/png",
            200, (1, 1)),
    "1x10000": (encode(Image.new("L", (1, 10_000), 255), "PNG"), "x.png", "image/png", 200,
                (1, 10_000)),
    "16-bit-png": (sixteen_bit_png(), "x.png", "image/png", 200, (80, 60)),
    "palette-png": (encode(quadrant(90, 70).convert("P"), "PNG"), "x.png", "image/png", 200,
                    (90, 70)),
    "cmyk-jpeg": (encode(quadrant(90, 70).convert("CMYK"), "JPEG"), "x.jpg", "image/jpeg", 200,
                  (90, 70)),
    "grayscale-jpeg": (encode(quadrant(90, 70).convert("L"), "JPEG"), "x.jpg", "image/jpeg",
                       200, (90, 70)),
    "rgba-png": (encode(quadrant(90, 70).convert("RGBA"), "PNG"), "x.png", "image/png", 200,
                 (90, 70)),
    "bmp": (encode(quadrant(90, 70), "BMP"), "x.bmp", "image/bmp", 200, (90, 70)),
    "tiff": (encode(quadrant(90, 70), "TIFF"), "x.tif", "image/tiff", 415, "not a JPEG"),
    "animated-gif": (animated("GIF"), "x.gif", "image/gif", 415, "not a JPEG"),
    "animated-webp": (animated("WEBP"), "x.webp", "image/webp", 200, (64, 48)),
    "png-named-jpg": (_PNG, "photo.jpg", "image/jpeg", 200, (300, 200)),
    "text-named-jpg": (b"hello, I am a JPEG\n" * 20, "photo.jpg", "image/jpeg", 415,
                       "not a JPEG"),
    "jpeg-named-text": (_JPEG, "notes.txt", "text/plain", 200, (300, 200)),
}  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize("name", CORPUS)
async def test_hostile_and_odd_images_get_a_200_or_a_clear_4xx(serve, name):
    data, filename, content_type, status, expected = CORPUS[name]
    async with serve() as (client, app):
        bright_box(app)
        r = await client.post("/v1/detect", files=upload(data, filename, content_type))
        live = await client.get("/health/live")
    assert r.status_code == status, r.text
    assert live.status_code == 200
    body = r.json()
    if status != 200:
        assert expected in body["detail"], body  # a JSON detail saying what is wrong
        return
    width, height = expected
    assert body["image"] == {"width": width, "height": height}
    for detection in body["detections"]:  # boxes stay inside the image
        box = detection["box"]
        assert -1e-3 <= box["x1"] <= box["x2"] <= width + 1e-3
        assert -1e-3 <= box["y1"] <= box["y2"] <= height + 1e-3


@pytest.mark.anyio
async def test_an_animated_webp_is_read_from_its_first_frame(serve):
    async with serve() as (client, app):
        bright_box(app)
        r = await client.post("/v1/detect", files=upload(animated("WEBP"), "a.webp", "image/webp"))
    [dog] = r.json()["detections"]
    # The first frame's white quarter (the second frame's is at the bottom right).
    assert list(dog["box"].values()) == pytest.approx([0, 0, 32, 24], abs=1.5)


@pytest.mark.anyio
@pytest.mark.parametrize("orientation", range(1, 9))
async def test_boxes_come_back_in_the_upright_images_pixels(serve, orientation):
    shown = quadrant(160, 96)  # the white quarter is (0, 0, 80, 48) once upright
    stored = shown if EXIF_STORE[orientation] is None else shown.transpose(EXIF_STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
    async with serve() as (client, app):
        bright_box(app)
        r = await client.post("/v1/detect", files=upload(data))
    body = r.json()
    assert body["image"] == {"width": 160, "height": 96}
    [dog] = body["detections"]
    # One input pixel is 1.25 x 0.75 image pixels; JPEG blurs the edge by about one.
    assert list(dog["box"].values()) == pytest.approx([0, 0, 80, 48], abs=3)


@pytest.mark.anyio
async def test_a_decompression_bomb_is_refused_without_decoding_and_memory_stays_flat(
    serve, monkeypatch
):
    bomb = png_declaring(100_000, 100_000)  # 30 GB as RGB; the file is 66 bytes
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or load(self))
    async with serve() as (client, _):
        await client.post("/v1/detect", files=upload(bomb, "bomb.png", "image/png"))  # warm
        rss_before = sum(read_rss_parts(os.getpid()).values())  # 0 without /proc
        can_reset = reset_peak_rss(os.getpid())  # the peak then covers what follows
        tracemalloc.start()
        try:
            answers = [
                await client.post("/v1/detect", files=upload(bomb, "bomb.png", "image/png"))
                for _ in range(20)
            ]
            _, python_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        rss_peak = read_peak_rss(os.getpid())
        live = await client.get("/health/live")
    assert {r.status_code for r in answers} == {413}
    assert "over the limit of 40000000 pixels" in answers[0].json()["detail"]
    assert decoded == []  # no pixel decoder ever ran
    assert python_peak < 4 * 2**20, python_peak  # Python-side allocations: bytes, not GB
    if can_reset and rss_before and rss_peak:
        assert rss_peak - rss_before < 64 * 2**20, (rss_before, rss_peak)  # the process's RSS
    assert live.status_code == 200


# ---- overload over real HTTP ----------------------------------------------------------------


async def queue_full(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return metric(text, "yolov1_rejections_total", reason="queue_full")


async def sequential_latency_s(client: httpx.AsyncClient, data: bytes, n: int) -> float:
    """Median seconds of ``n`` requests sent one after the other (all must succeed)."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        r = await client.post("/v1/detect", files=upload(data))
        times.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
    return statistics.median(times)


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_a_burst_of_four_times_the_queue_gets_one_answer_each(live):
    burst = 4 * MAX_QUEUE
    data = encode(quadrant(320, 240), "JPEG")
    limits = httpx.Limits(max_connections=burst + 8)
    async with httpx.AsyncClient(
        base_url=live.url, headers={"X-API-Key": API_KEY}, timeout=60, limits=limits
    ) as client:
        before_s = await sequential_latency_s(client, data, 5)
        rejected_before = await queue_full(client)
        depths: list[float] = []

        async def sample_queue() -> None:
            while True:
                depths.append(metric((await client.get("/metrics")).text, "yolov1_queue_depth"))
                await asyncio.sleep(0.005)

        async def send() -> httpx.Response | Exception:
            try:
                return await client.post("/v1/detect", files=upload(data))
            except httpx.HTTPError as exc:  # counted as "other": there must be none
                return exc

        live.hold()
        sampler = asyncio.create_task(sample_queue())
        try:
            occupier = asyncio.create_task(send())  # runs first and holds the worker
            await live.wait_held()
            tasks = [asyncio.create_task(send()) for _ in range(burst)]
            # While the worker is held only refusals can come back: wait for all of them.
            await poll(lambda: sum(t.done() for t in tasks) >= burst - MAX_QUEUE, 60)
            full = metric((await client.get("/metrics")).text, "yolov1_queue_depth")
            live.release()
            answers = await asyncio.gather(occupier, *tasks)
        finally:
            live.release()
            sampler.cancel()
        after_s = await sequential_latency_s(client, data, 5)
        rejected = await queue_full(client) - rejected_before

    statuses = Counter(a.status_code if isinstance(a, httpx.Response) else "other" for a in answers)
    print(f"\noverload: sent {len(answers)} (burst {burst} + 1 holding the worker), "
          f"200: {statuses[200]}, 503: {statuses[503]}, "
          f"other: {len(answers) - statuses[200] - statuses[503]}; queue depth max "
          f"{max(depths):g} of {MAX_QUEUE} over {len(depths)} samples; sequential latency "
          f"{1000 * before_s:.1f} ms before, {1000 * after_s:.1f} ms after")  # fmt: skip
    assert statuses == {200: 1 + MAX_QUEUE, 503: burst - MAX_QUEUE}
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["retry-after"] == "1"
            assert answer.json() == {"detail": "queue is full, retry later"}
    assert full == MAX_QUEUE and max(depths) <= MAX_QUEUE
    assert rejected == burst - MAX_QUEUE
    # Serving at full speed again. A loose bound: the CPU is shared; a stuck or degraded
    # service would be many times slower.
    assert after_s < 3 * before_s + 0.2


# ---- faults -----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.timeout(60)
async def test_a_failing_batch_fails_only_its_own_requests_among_concurrent_ones(serve, gate):
    data = encode(quadrant(120, 90), "JPEG")
    async with serve(max_batch_size=2, max_images_per_request=8, max_queue=8) as (client, app):
        backend = bright_box(app, fail_on=frozenset({2}))  # the second batch raises
        with gate(app) as held:
            first = asyncio.create_task(client.post("/v1/detect", files=upload(data)))
            await held.wait_held()
            queued = [
                asyncio.create_task(client.post("/v1/detect", files=upload(data))) for _ in range(4)
            ]
            await held.wait_queued(4)
            held.release()
            answers = await asyncio.gather(first, *queued)
        after = await client.post("/v1/detect", files=upload(data))
        text = (await client.get("/metrics")).text
    assert held.batches == [1, 2, 2, 1] and backend.calls == 4  # the last: `after`
    failed = [r for r in answers if r.status_code == 500]
    assert len(failed) == 2  # exactly the failing batch's two requests
    assert all(r.json() == {"detail": "inference failed for this batch (RuntimeError)"}
               for r in failed)  # fmt: skip
    assert [r.status_code for r in answers].count(200) == 3
    assert after.status_code == 200 and after.json()["detections"]
    assert metric(text, "yolov1_batch_failures_total") == 1


@pytest.mark.anyio
async def test_a_batcher_stop_with_a_timeout_answers_everyone():
    """Regression: ``stop`` used to wait for a running batch however long it took."""
    entered, released = threading.Event(), threading.Event()

    def stuck(items: list[int]) -> list[int]:
        entered.set()
        released.wait(timeout=30)
        return items

    batcher: Batcher[int, int] = Batcher(stuck, max_batch_size=1, max_wait_s=0, max_queue=4)
    batcher.start()
    try:
        futures = batcher.submit([1]) + batcher.submit([2])
        await asyncio.to_thread(entered.wait, 10)
        # Before the fix this waited for the thread, here for ever (30 s).
        await asyncio.wait_for(batcher.stop(timeout_s=0.05), timeout=5)
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert [type(r) for r in results] == [BatcherStopped, BatcherStopped]
        assert "before this batch finished" in str(results[0])
        assert "before this request ran" in str(results[1])
        assert batcher.busy  # the thread still runs the abandoned batch
    finally:
        released.set()


@pytest.mark.timeout(120)
@pytest.mark.anyio
async def test_sigterm_exits_zero_within_the_grace_period_even_inside_a_batch(weights, tmp_path):
    """Regression: a batch outliving the grace period kept the process alive until it ended,
    and its clients got uvicorn's plain-text 500 when the server cancelled them."""
    grace_s = 1.0
    server = LiveServer(
        weights, tmp_path, max_batch_size=1, max_images_per_request=4, max_queue=4,
        drain_timeout_s=grace_s,
    )  # fmt: skip
    try:
        server.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            server.hold()
            files = upload(encode(quadrant(64, 48), "JPEG"))
            admitted = [asyncio.create_task(client.post("/v1/detect", files=files))]
            await server.wait_held()
            admitted += [asyncio.create_task(client.post("/v1/detect", files=files))
                         for _ in range(2)]  # fmt: skip
            deadline = time.monotonic() + 30
            while metric((await client.get("/metrics")).text, "yolov1_queue_depth") < 2:
                assert time.monotonic() < deadline, "the two requests never queued"
                await asyncio.sleep(0.01)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)  # the held batch never ends
            answers = await asyncio.gather(*admitted)
            answered_s = time.monotonic() - signalled
        status = await asyncio.to_thread(server.process.wait, 60)
        exited_s = time.monotonic() - signalled
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        log = server.log()
    assert [r.status_code for r in answers] == [503, 503, 503], [r.text for r in answers]
    assert all(r.headers["retry-after"] == "1" and "stopped before" in r.json()["detail"]
               for r in answers)  # fmt: skip
    assert status == 0, log
    # The grace period, plus the start of a shutdown on a shared CPU; without the fix it never
    # exited while the batch was held.
    assert answered_s < grace_s + 5 and exited_s < grace_s + 10, (answered_s, exited_s)
    assert "Traceback" not in log, log


class Pickled:
    """Unpickling this would create the marker file: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.timeout(120)
def test_a_pickle_behind_uvicorn_app_main_app_stops_with_one_line_unexecuted(tmp_path):
    """``yolov1-serve`` checks the header before uvicorn starts (tests/test_service_process.py);
    ``uvicorn app.main:app`` meets the file only in the lifespan."""
    weights = tmp_path / "evil.safetensors"
    weights.write_bytes(pickle.dumps(Pickled(tmp_path / "executed")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLOV1_")}
    env.update(YOLOV1_WEIGHTS=str(weights), YOLOV1_BACKEND="torch", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", "0"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert proc.returncode != 0
    assert not (tmp_path / "executed").exists()
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "evil.safetensors" in line]
    assert "not a readable safetensors file" in line


# ---- auth -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_model_route_needs_a_key_and_probes_and_metrics_stay_open(serve):
    async with serve(api_keys=f"other-key,{API_KEY}") as (client, _):
        missing = await client.get("/v1/model")
        wrong = await client.get("/v1/model", headers={"X-API-Key": API_KEY + "x"})
        wrong_bearer = await client.get("/v1/model", headers={"Authorization": "Bearer nope"})
        basic = await client.get("/v1/model", headers={"Authorization": f"Basic {API_KEY}"})
        by_header = await client.get("/v1/model", headers={"X-API-Key": API_KEY})
        by_bearer = await client.get("/v1/model", headers={"Authorization": f"Bearer {API_KEY}"})
        open_routes = [await client.get(path) for path in
                       ("/health/live", "/health/ready", "/metrics", "/openapi.json")]  # fmt: skip
    assert [r.status_code for r in (missing, wrong, wrong_bearer, basic)] == [401] * 4
    assert all(r.headers["www-authenticate"] == "Bearer" for r in (missing, wrong))
    assert by_header.status_code == by_bearer.status_code == 200
    assert by_header.json()["class_names"] == list(VOC_CLASSES)
    assert [r.status_code for r in open_routes] == [200] * 4


# ---- the soak script --------------------------------------------------------------------------


@pytest.mark.slow  # about 15 s: two interpreter starts with torch, and 3 s of traffic
@pytest.mark.timeout(180)
def test_a_short_soak_gets_only_expected_answers(weights, tmp_path):
    """``benchmarks.soak`` end to end for a few seconds; its figures come from longer runs."""
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(320, 240), (200, 300)]):
        quadrant(*size).save(images / f"{i}.jpg")
    out = tmp_path / "soak.json"
    # At least two full cycles of the mix, however slow the machine is.
    command = [sys.executable, "-m", "benchmarks.soak", "--duration", "3", "--min-requests", "40",
               "--concurrency", "2", "--weights", str(weights), "--images", str(images),
               "--sample-every", "1", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["run"]["answers"]) == {"good", "random", "truncated", "bomb", "gif",
                                              "text", "oversize"}  # fmt: skip
    assert results["summary"]["unexpected"] == {}
    assert results["run"]["answers"]["good"]["200"] > 0
    assert results["summary"]["rss_start_bytes"] > 0 and results["exit_status"] == 0
    assert "unexpected answers: none" in done.stdout
