"""The real app through httpx (lifespan included): answers, batching, every error, overload,
auth, draining and disconnects. Each response is also checked against the OpenAPI schema."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import zlib
from functools import cache

import httpx
import numpy as np
import pytest
import requests
import schemathesis
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.backends import detections_from_grid
from app.inference import Detections, DetectOptions
from model import VOC_CLASSES, encode_targets
from model.checkpoint import file_sha256

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

DOG, PERSON = VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")
DOG_BOX = (0.1, 0.2, 0.5, 0.8)  # xyxy normalised; centre in cell (row 1, col 0) of the 2x2 grid
PERSON_BOX = (0.6, 0.1, 0.9, 0.4)  # centre in cell (row 0, col 1)


def jpeg(width: int = 320, height: int = 200, orientation: int | None = None) -> bytes:
    """An upright image whose top-left quarter is white, stored rotated when ``orientation``."""
    image = Image.new("RGB", (width, height))
    image.paste((255, 255, 255), (0, 0, width // 2, height // 2))
    kw = {}
    if orientation == 6:  # stored rotated 90 degrees anticlockwise; viewers turn it back
        image = image.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        kw["exif"] = exif.tobytes()
    out = io.BytesIO()
    image.save(out, "JPEG", **kw)
    return out.getvalue()


def upload(data: bytes, name: str = "image", filename: str = "x.jpg") -> dict:
    return {name: (filename, data, "image/jpeg")}


class FakeBackend:
    """Stands in for the network: a known grid with a dog (score 1) and a person (score 0.5)."""

    name, device, dtype, lanes = "fake", "cpu", "float32", 1

    def __init__(self, S: int = 2, B: int = 2, C: int = 20):
        self.B, self.C = B, C
        boxes = torch.tensor([DOG_BOX, PERSON_BOX])
        target = encode_targets(boxes, torch.tensor([DOG, PERSON]), S, C)  # (S, S, C+5)
        grid = torch.zeros(S, S, C + 5 * B)  # (S, S, C+5B), the second box of each cell empty
        grid[..., : C + 5] = target
        grid[..., C + 3 : C + 5] = target[..., C + 3 : C + 5].sqrt()  # the net predicts sqrt(w, h)
        grid[0, 1, C] = 0.5  # the person's confidence
        self.grid = grid
        self.inputs: list[torch.Tensor] = []
        self.fail_next = False

    def detect(
        self, images: list[np.ndarray], options: list[DetectOptions], concurrent: bool = False
    ) -> list[Detections]:
        self.inputs.append(np.stack(images))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        grid = self.grid.expand(len(images), *self.grid.shape)  # (N, S, S, C+5B)
        return detections_from_grid(grid, options, self.B, self.C)


def fake(app) -> FakeBackend:
    backend = FakeBackend()
    app.state.service.detector.backend = backend
    return backend


@cache
def _contract(schema_json: str):
    return schemathesis.openapi.from_dict(json.loads(schema_json))


def conforms(app, response: httpx.Response) -> httpx.Response:
    """Assert that the status is documented for the route and the body matches its schema."""
    raw = app.openapi()
    path, method = response.request.url.path, response.request.method
    assert str(response.status_code) in raw["paths"][path][method.lower()]["responses"], (
        f"{response.status_code} not documented for {method} {path}"
    )
    request = requests.Request(method, str(response.request.url)).prepare()  # body not needed
    checked = schemathesis.Response(
        response.status_code,
        {key: [value] for key, value in response.headers.items()},
        response.content,
        request,
        elapsed=0.0,
        verify=True,
    )
    _contract(json.dumps(raw))[path][method].validate_response(checked)
    return response


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(f"{name}{labels} not in the metrics")


def pixels(box, width, height) -> list[float]:
    return [box[0] * width, box[1] * height, box[2] * width, box[3] * height]


# ---- answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [None, 6])
async def test_detect_answers_in_pixels_of_the_upright_upload(serve, weights, orientation):
    async with serve() as (client, app):
        backend = fake(app)
        r = conforms(
            app, await client.post("/v1/detect", files=upload(jpeg(320, 200, orientation)))
        )
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == {"name": "yolov1-tiny", "version": file_sha256(weights)[:12]}
    assert body["image"] == {"width": 320, "height": 200}
    dog, person = body["detections"]  # sorted by confidence
    assert (dog["class_id"], dog["label"], person["label"]) == (DOG, "dog", "person")
    assert dog["confidence"] == pytest.approx(1.0) and person["confidence"] == pytest.approx(0.5)
    assert list(dog["box"].values()) == pytest.approx(pixels(DOG_BOX, 320, 200), abs=1e-3)
    assert list(person["box"].values()) == pytest.approx(pixels(PERSON_BOX, 320, 200), abs=1e-3)
    timing = body["timing_ms"]
    assert 0 <= timing["queue"] <= timing["total"] and 0 <= timing["inference"] <= timing["total"]
    # The network saw the upright image, plainly resized to its 128 x 128 input.
    [image] = backend.inputs[-1]
    assert image.shape == (3, 128, 128)
    assert image[:, :64, :64].mean() > 0.9 and image[:, 64:, :].mean() < 0.1


async def test_query_parameters_filter_the_detections(serve):
    async with serve() as (client, app):
        fake(app)

        async def labels(**params) -> list[str]:
            r = await client.post("/v1/detect", files=upload(jpeg()), params=params)
            assert r.status_code == 200, r.text
            return [d["label"] for d in r.json()["detections"]]

        assert await labels() == ["dog", "person"]
        assert await labels(confidence=0.6) == ["dog"]
        assert await labels(classes="person") == ["person"]
        assert await labels(classes=["person", "dog"], max_detections=1) == ["dog"]
        assert await labels(classes="cat") == []
        assert await labels(classes="") == ["dog", "person"]  # an empty list: no filter


async def test_batch_answers_in_upload_order(serve):
    sizes = [(320, 200), (64, 480), (100, 100)]
    files = [("images", (f"{i}.jpg", jpeg(w, h), "image/jpeg")) for i, (w, h) in enumerate(sizes)]
    async with serve() as (client, app):
        fake(app)
        r = conforms(app, await client.post("/v1/detect/batch", files=files))
    assert r.status_code == 200
    results = r.json()["results"]
    assert [(x["image"]["width"], x["image"]["height"]) for x in results] == sizes
    for result, (w, h) in zip(results, sizes, strict=True):
        box = list(result["detections"][0]["box"].values())
        assert box == pytest.approx(pixels(DOG_BOX, w, h), abs=1e-3)


async def test_render_returns_the_upright_image_with_boxes(serve):
    async with serve() as (client, app):
        fake(app)
        r = conforms(app, await client.post("/v1/detect/render", files=upload(jpeg(320, 200, 6))))
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    drawn = Image.open(io.BytesIO(r.content))
    assert drawn.format == "JPEG" and drawn.size == (320, 200)
    # The box outline is orange where the image was black (JPEG blurs its 2-pixel width).
    x2, y = round(DOG_BOX[2] * 320) - 1, round(0.7 * 200)
    red, _, blue = drawn.convert("RGB").getpixel((x2, y))
    assert red > blue + 80


async def test_a_batch_upload_larger_than_a_batch_spans_several(serve):
    sizes = [(320, 200), (64, 480), (100, 100), (200, 64), (90, 90)]
    files = [("images", (f"{i}.jpg", jpeg(w, h), "image/jpeg")) for i, (w, h) in enumerate(sizes)]
    async with serve(max_batch_size=2, max_images_per_request=5, max_queue=8) as (client, app):
        fake(app)
        r = conforms(app, await client.post("/v1/detect/batch", files=files))
        info = (await client.get("/v1/model")).json()
        text = (await client.get("/metrics")).text
    assert r.status_code == 200
    assert [(x["image"]["width"], x["image"]["height"]) for x in r.json()["results"]] == sizes
    assert (
        metric(text, "yolov1_batch_size_sum") == 5 and metric(text, "yolov1_batch_size_count") == 3
    )
    assert info["batching"]["max_batch_size"] == 2


async def test_the_batch_size_defaults_to_the_devices(serve):
    async with serve() as (client, _):
        batching = (await client.get("/v1/model")).json()["batching"]
    assert (batching["max_batch_size"], batching["max_images_per_request"]) == (4, 16)


async def test_model_health_and_metrics_describe_the_service(serve, weights):
    async with serve(max_batch_size=4, max_images_per_request=6, max_queue=8) as (client, app):
        info = conforms(app, await client.get("/v1/model")).json()
        live = conforms(app, await client.get("/health/live"))
        ready = conforms(app, await client.get("/health/ready"))
        text = (await client.get("/metrics")).text
    assert info["version"] == file_sha256(weights)[:12] and info["weights"] == "w.safetensors"
    assert (info["arch"], info["grid_size"], info["boxes_per_cell"]) == ("yolov1-tiny", 2, 2)
    assert (info["num_classes"], info["image_size"]) == (20, 128)
    assert info["class_names"] == list(VOC_CLASSES)
    assert (info["backend"], info["device"], info["dtype"]) == ("torch", "cpu", "float32")
    assert info["batching"] == {
        "max_batch_size": 4, "lanes": 1, "max_images_per_request": 6, "max_wait_ms": 2.0,
        "max_queue": 8, "request_timeout_s": 30.0,
    }  # fmt: skip
    assert live.json() == ready.json() == {"status": "ok"}
    assert metric(text, "yolov1_requests_total", route="/v1/model", status="200") == 1
    assert metric(text, "yolov1_queue_depth") == 0
    assert metric(text, "yolov1_rejections_total", reason="queue_full") == 0
    assert metric(text, "yolov1_batch_size_count") == 0  # the warm-up is not counted


# ---- batching and overload ----------------------------------------------------------------


async def test_requests_queued_behind_a_busy_worker_run_as_one_batch(serve, gate):
    n = 6
    async with serve(max_batch_size=8, max_queue=16) as (client, app):
        with gate(app) as held:
            first = asyncio.create_task(client.post("/v1/detect", files=upload(jpeg())))
            await held.wait_held()
            rest = [
                asyncio.create_task(client.post("/v1/detect", files=upload(jpeg())))
                for _ in range(n)
            ]
            await held.wait_queued(n)
            held.release()
            responses = await asyncio.gather(first, *rest)
        text = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [200] * (n + 1)
    assert held.batches == [1, n]
    assert metric(text, "yolov1_batch_size_count") == 2
    assert metric(text, "yolov1_batch_size_sum") == 1 + n
    assert metric(text, "yolov1_batch_size_bucket", le="4.0") == 1  # the lone first request
    assert metric(text, "yolov1_queue_wait_seconds_count") == n + 1


def noise_jpeg(seed: int, size: int = 160) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def assert_same_detections(got: list[dict], expected: list[dict]) -> None:
    assert [d["label"] for d in got] == [d["label"] for d in expected]
    for g, e in zip(got, expected, strict=True):
        assert g["confidence"] == pytest.approx(e["confidence"], rel=1e-4, abs=1e-5)
        corners = ("x1", "y1", "x2", "y2")
        assert [g["box"][k] for k in corners] == pytest.approx(
            [e["box"][k] for k in corners], rel=1e-4, abs=1e-3
        )


async def test_two_lanes_answer_concurrent_requests_as_one_at_a_time(serve):
    """ONNX Runtime with two lanes: a burst runs as concurrent batches on the lane session."""
    uploads = [noise_jpeg(seed) for seed in range(12)]
    params = {"confidence": 0.0, "max_detections": 20}
    async with serve(backend="onnxruntime", inference_lanes=2, max_batch_size=2) as (client, app):
        info = (await client.get("/v1/model")).json()
        batcher, lane_batches = app.state.service.batcher, []
        run_lane = batcher.run_lane
        batcher.run_lane = lambda jobs: lane_batches.append(len(jobs)) or run_lane(jobs)
        one_by_one = [
            (await client.post("/v1/detect", params=params, files=upload(u))).json()
            for u in uploads
        ]
        burst = await asyncio.gather(
            *(client.post("/v1/detect", params=params, files=upload(u)) for u in uploads)
        )
        text = (await client.get("/metrics")).text
    assert (info["backend"], info["batching"]["lanes"]) == ("onnxruntime", 2)
    assert [r.status_code for r in burst] == [200] * len(uploads)
    assert sum(len(r["detections"]) for r in one_by_one) > len(uploads)  # something to compare
    for response, alone in zip(burst, one_by_one, strict=True):
        assert_same_detections(response.json()["detections"], alone["detections"])
    # Twelve at once, two per batch: the first batch cannot be alone, so lanes ran.
    assert lane_batches and max(lane_batches) <= 2
    assert metric(text, "yolov1_batch_size_count") < 2 * len(uploads)


async def test_a_burst_over_the_queue_limit_gets_one_answer_each(serve, gate):
    max_queue, burst = 4, 16
    async with serve(max_batch_size=2, max_images_per_request=2, max_queue=max_queue) as (
        client,
        app,
    ):
        depths = []
        with gate(app) as held:
            submit = app.state.service.batcher.submit

            def watched(items):
                futures = submit(items)
                depths.append(app.state.service.batcher.queue_depth)
                return futures

            app.state.service.batcher.submit = watched
            first = asyncio.create_task(client.post("/v1/detect", files=upload(jpeg())))
            await held.wait_held()
            burst_tasks = [
                asyncio.create_task(client.post("/v1/detect", files=upload(jpeg())))
                for _ in range(burst)
            ]
            await held.wait_queued(max_queue)
            # While the worker is held only the refused get answers; the admitted wait.
            done, pending = set(), set(burst_tasks)
            while len(done) < burst - max_queue:
                finished, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
                done |= finished
            refused = [t.result() for t in done]
            held.release()
            admitted = await asyncio.gather(first, *pending)
        after = await client.post("/v1/detect", files=upload(jpeg()))
        text = (await client.get("/metrics")).text
    assert len(pending) == max_queue and len(refused) == burst - max_queue
    for r in refused:
        conforms(app, r)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "queue" in r.json()["detail"]
    assert [r.status_code for r in admitted] == [200] * (1 + max_queue)
    assert max(depths) <= max_queue
    assert after.status_code == 200  # serving normally again
    assert metric(text, "yolov1_rejections_total", reason="queue_full") == burst - max_queue
    assert metric(text, "yolov1_requests_total", route="/v1/detect", status="503") == len(refused)


# ---- errors -------------------------------------------------------------------------------


def bomb() -> bytes:
    """A 1 x 1 PNG whose header is rewritten to declare 100000 x 100000 pixels (30 GB as RGB)."""
    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, "PNG")
    data = bytearray(out.getvalue())
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))  # IHDR CRC over type + fields
    return bytes(data)


def gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "GIF")
    return out.getvalue()


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "detail"),
    [
        ("/v1/detect", {"files": upload(jpeg()[:500])}, 400, "cannot read"),
        ("/v1/detect", {"files": upload(b"")}, 400, "empty"),
        ("/v1/detect", {"content": b"not multipart", "headers": {"content-type": "text/plain"}},
         422, None),
        ("/v1/detect", {"files": upload(bomb(), filename="bomb.png")}, 413,
         "over the limit of 40000000 pixels"),
        ("/v1/detect", {"files": upload(b"\x00" * 3000)}, 413, "limit of 2048"),
        ("/v1/detect/render", {"files": upload(b"\x00" * 200_000)}, 413, "request body"),
        ("/v1/detect", {"files": upload(gif(), filename="x.jpg")}, 415, "not a JPEG"),
        ("/v1/detect", {"files": upload(b"GIF89a lies")}, 415, "not a JPEG"),
        ("/v1/detect", {"files": upload(jpeg()), "params": {"confidence": 2}}, 422, None),
        ("/v1/detect", {"files": upload(jpeg()), "params": {"iou": -1}}, 422, None),
        ("/v1/detect", {"files": upload(jpeg()), "params": {"max_detections": 0}}, 422, None),
        ("/v1/detect", {"files": upload(jpeg()), "params": {"classes": "unicorn"}}, 422,
         "unknown class names ['unicorn']"),
        ("/v1/detect", {"files": upload(jpeg(), name="picture")}, 422, None),
        ("/v1/detect/batch", {"files": [("images", ("a.jpg", jpeg(), "image/jpeg"))] * 3}, 422,
         "at most 2"),
        ("/v1/detect/batch", {"files": [("images", ("a.bin", b"\x00" * 3000, "image/jpeg"))]},
         413, "limit of 2048"),
    ],
    ids=[
        "truncated", "empty", "not-multipart", "bomb", "file-over-limit", "body-over-limit",
        "gif", "lying-bytes", "confidence", "iou", "max-detections", "unknown-class",
        "wrong-field", "too-many-images", "batch-file-over-limit",
    ],
)  # fmt: skip
async def test_bad_requests_get_a_json_error(serve, path, kwargs, status, detail):
    async with serve(max_upload_bytes=2048, max_images_per_request=2, max_queue=4) as (client, app):
        r = conforms(app, await client.post(path, **kwargs))
        assert (await client.get("/health/ready")).status_code == 200  # still serving
    assert r.status_code == status, r.text
    assert "detail" in r.json()
    if detail is not None:
        message = r.json()["detail"]
        if status == 422:  # FastAPI's list of {loc, msg, type}, our own checks included
            message = " ".join(issue["msg"] for issue in message)
        assert detail in message


async def test_a_declared_oversize_body_is_refused_before_it_is_read(serve):
    async with serve(max_upload_bytes=1000) as (client, app):
        messages = []

        async def receive():
            raise AssertionError("the body must not be read")

        async def send(message):
            messages.append(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/detect", "raw_path": b"/v1/detect", "query_string": b"",
            "root_path": "", "headers": [(b"content-length", b"1000000000"),
                                         (b"content-type", b"multipart/form-data; boundary=x")],
            "client": ("127.0.0.1", 1), "server": ("test", 80), "state": {},
        }  # fmt: skip
        await app(scope, receive, send)
    assert messages[0]["status"] == 413
    assert json.loads(messages[1]["body"])["detail"].startswith("request body is over the limit")


async def test_a_chunked_oversize_body_is_cut_off(serve):
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    sent = []

    async def body():  # no Content-Length: httpx sends it chunked
        yield head
        for _ in range(1000):
            sent.append(1)
            yield b"\xff" * 1024
        yield f"\r\n--{boundary}--\r\n".encode()

    async with serve(max_upload_bytes=1000) as (client, app):
        r = await client.post(
            "/v1/detect",
            content=body(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        conforms(app, r)
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    assert len(sent) < 1000  # reading stopped near the limit


async def test_an_exception_in_a_batch_fails_only_that_batch(serve):
    async with serve() as (client, app):
        backend = fake(app)
        backend.fail_next = True
        failed = conforms(app, await client.post("/v1/detect", files=upload(jpeg())))
        ok = await client.post("/v1/detect", files=upload(jpeg()))
        text = (await client.get("/metrics")).text
    assert failed.status_code == 500
    assert failed.json() == {"detail": "inference failed for this batch (RuntimeError)"}
    assert ok.status_code == 200
    assert metric(text, "yolov1_batch_failures_total") == 1


async def test_the_deadline_gives_504(serve, gate):
    async with serve(request_timeout_s=0.5) as (client, app):
        with gate(app) as held:
            running = asyncio.create_task(client.post("/v1/detect", files=upload(jpeg())))
            await held.wait_held()
            queued = await client.post("/v1/detect", files=upload(jpeg()))
            held.release()
            await running
        text = (await client.get("/metrics")).text
    conforms(app, queued)
    assert queued.status_code == 504 and "deadline" in queued.json()["detail"]
    assert held.batches == [1]  # the timed-out request never ran
    assert metric(text, "yolov1_rejections_total", reason="deadline") >= 1


async def test_not_ready_gives_503(weights):
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(weights=weights, backend="torch"))  # lifespan not started
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        ready = await client.get("/health/ready")
        detect = await client.post("/v1/detect", files=upload(jpeg()))
        live = await client.get("/health/live")
    assert ready.status_code == 503 and ready.json() == {"detail": "not ready: loading"}
    assert detect.status_code == 503 and detect.headers["retry-after"] == "1"
    assert live.status_code == 200


# ---- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/detect", "/v1/detect/batch", "/v1/detect/render"])
async def test_api_keys_guard_every_detection_route(serve, path):
    field = "images" if path.endswith("batch") else "image"
    async with serve(api_keys="first-key, second-key") as (client, app):

        async def post(headers):
            return await client.post(path, files=upload(jpeg(), name=field), headers=headers)

        missing = conforms(app, await post({}))
        wrong = conforms(app, await post({"X-API-Key": "first-key-but-longer"}))
        wrong_bearer = await post({"Authorization": "Bearer nope"})
        by_header = await post({"X-API-Key": "second-key"})
        by_bearer = await post({"Authorization": "Bearer first-key"})
        open_routes = [
            await client.get(p) for p in ("/health/live", "/health/ready", "/metrics", "/docs")
        ]
        model_info = await client.get("/v1/model")
    assert [missing.status_code, wrong.status_code, wrong_bearer.status_code] == [401] * 3
    assert missing.json() == {"detail": "missing API key"}
    assert wrong.json() == {"detail": "invalid API key"}
    assert by_header.status_code == by_bearer.status_code == 200
    assert [r.status_code for r in open_routes] == [200] * 4
    assert model_info.status_code == 401


async def test_auth_is_off_without_keys(serve):
    async with serve() as (client, _):
        r = await client.post("/v1/detect", files=upload(jpeg()))
    assert r.status_code == 200


# ---- draining and disconnects ---------------------------------------------------------------


async def test_draining_refuses_new_requests_and_finishes_admitted_ones(serve, gate):
    async with serve() as (client, app):
        service = app.state.service
        with gate(app) as held:
            admitted = asyncio.create_task(client.post("/v1/detect", files=upload(jpeg())))
            await held.wait_held()
            draining = asyncio.create_task(service.drain(timeout_s=30))
            await asyncio.sleep(0)  # the task starts: draining is on before the next request
            assert service.draining
            ready = conforms(app, await client.get("/health/ready"))
            refused = conforms(app, await client.post("/v1/detect", files=upload(jpeg())))
            assert not draining.done()  # still waiting for the admitted request
            held.release()
            answer = await admitted
            await draining
        text = (await client.get("/metrics")).text
    assert ready.status_code == 503 and ready.json() == {"detail": "not ready: draining"}
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {"detail": "service is draining for shutdown"}
    assert answer.status_code == 200
    assert metric(text, "yolov1_rejections_total", reason="draining") == 1


async def test_a_client_that_leaves_while_queued_is_dropped(serve, gate):
    request = httpx.Request("POST", "http://test/v1/detect", files=upload(jpeg()))
    body, content_type = request.read(), request.headers["content-type"]
    async with serve() as (client, app):
        with gate(app) as held:
            running = asyncio.create_task(client.post("/v1/detect", files=upload(jpeg())))
            await held.wait_held()
            leave = asyncio.Event()
            messages = iter([{"type": "http.request", "body": body, "more_body": False}])

            async def receive():
                message = next(messages, None)
                if message is not None:
                    return message
                await leave.wait()
                return {"type": "http.disconnect"}

            sent = []

            async def send(message):
                sent.append(message)

            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                "method": "POST", "scheme": "http", "path": "/v1/detect",
                "raw_path": b"/v1/detect", "query_string": b"", "root_path": "",
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode())],
                "client": ("127.0.0.1", 1), "server": ("test", 80), "state": {},
            }  # fmt: skip
            leaving = asyncio.create_task(app(scope, receive, send))
            await held.wait_queued(1)
            leave.set()
            await leaving
            assert app.state.service.batcher.queue_depth == 0  # dropped before running
            held.release()
            assert (await running).status_code == 200
        text = (await client.get("/metrics")).text
    assert held.batches == [1]  # only the first request ever ran
    assert metric(text, "yolov1_rejections_total", reason="disconnected") == 1


async def test_default_confidence_comes_from_the_checkpoint_unless_set(serve, weights, tmp_path):
    import shutil

    from model.checkpoint import update_metadata

    calibrated = tmp_path / "calibrated.safetensors"
    shutil.copy(weights, calibrated)
    update_metadata(calibrated, conf_threshold=0.07)
    async with serve(weights=calibrated) as (client, _):
        assert (await client.get("/v1/model")).json()["conf_threshold"] == 0.07
    async with serve(weights=calibrated, conf_threshold=0.4) as (client, _):
        assert (await client.get("/v1/model")).json()["conf_threshold"] == 0.4
    async with serve() as (client, _):  # no calibration recorded: the fallback
        assert (await client.get("/v1/model")).json()["conf_threshold"] == 0.25
