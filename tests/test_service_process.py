"""``yolov1-serve`` as a real process: startup faults and SIGTERM draining."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from safetensors.torch import save_file

from model import VOC_CLASSES, build_model
from model.checkpoint import METADATA_KEY, model_metadata

REPO = Path(__file__).resolve().parents[1]

# Runs yolov1-serve with the inference worker held, once armed, until a release file appears.
HELD_SERVER = """
import sys, time
from pathlib import Path
import app.inference
armed, entered, release = (Path(p) for p in sys.argv[1:4])
run_batch = app.inference.Detector.__call__
def held(self, jobs, **kw):
    if armed.exists():
        entered.touch()
        while not release.exists():
            time.sleep(0.01)
    return run_batch(self, jobs, **kw)
app.inference.Detector.__call__ = held
from app.main import run
run()
"""


def server_env(weights: Path, port: int = 0, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLOV1_")}
    env.update(
        YOLOV1_WEIGHTS=str(weights), YOLOV1_BACKEND="torch", YOLOV1_HOST="127.0.0.1",
        YOLOV1_PORT=str(port), PYTHONPATH=str(REPO),
    )  # fmt: skip
    env.update({f"YOLOV1_{k.upper()}": v for k, v in settings.items()})
    return env


class Pickled:
    """Unpickling this would create the marker file: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def faulty(tmp_path: Path, weights: Path) -> dict[str, Path]:
    """Weights files that must not start the service."""
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    pickled = tmp_path / "pickle.safetensors"
    pickled.write_bytes(pickle.dumps(Pickled(tmp_path / "executed")))
    # Metadata for 20 classes over tensors for 10: only loading the tensors finds out.
    mismatched = tmp_path / "mismatched.safetensors"
    ten = build_model("yolov1-tiny", num_classes=10, image_size=128)
    meta = model_metadata(build_model("yolov1-tiny", image_size=128), list(VOC_CLASSES))
    tensors = {k: v for k, v in ten.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(tensors, str(mismatched), metadata={METADATA_KEY: json.dumps(meta)})
    return {"truncated": truncated, "pickle": pickled, "mismatched": mismatched}


@pytest.mark.parametrize(
    ("weights_file", "settings", "expected"),
    [
        ("absent", {}, "absent.safetensors: no such file"),
        ("truncated", {}, "truncated.safetensors: not a readable safetensors file"),
        ("pickle", {}, "pickle.safetensors: not a readable safetensors file"),
        (
            None,
            {"max_batch_size": "many"},
            "YOLOV1_MAX_BATCH_SIZE: Input should be a valid integer",
        ),
        (
            None,
            {"max_batch_size": "8", "max_queue": "4"},
            "max_queue (4) must be >= max_batch_size",
        ),
        (None, {"device": "gpu please"}, "YOLOV1_DEVICE: Value error, not 'auto', 'cpu'"),
    ],
    ids=["missing", "truncated", "pickle", "not-a-number", "queue-below-batch", "device"],
)
def test_yolov1_serve_refuses_to_start_with_one_line(
    weights_file, settings, expected, faulty, weights, tmp_path, monkeypatch
):
    path = (
        weights
        if weights_file is None
        else faulty.get(weights_file, tmp_path / "absent.safetensors")
    )
    for key in [k for k in os.environ if k.startswith("YOLOV1_")]:
        monkeypatch.delenv(key)
    for key, value in server_env(path, **settings).items():
        monkeypatch.setenv(key, value)
    from app.main import run

    with pytest.raises(SystemExit) as exit_info:
        run()  # exits before uvicorn starts
    message = exit_info.value.code  # a string: Python prints it to stderr and exits with 1
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("yolov1-serve: ") and expected in message
    assert not (tmp_path / "executed").exists()  # the pickle was never loaded


@pytest.mark.timeout(120)
def test_a_checkpoint_that_fails_to_load_stops_the_process_with_one_line(faulty, tmp_path):
    """Past the header check, the failure is in the lifespan: uvicorn must exit, not serve."""
    proc = subprocess.run(
        [sys.executable, "-m", "app.main"], env=server_env(faulty["mismatched"]), cwd=tmp_path,
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    mentions = [line for line in proc.stderr.splitlines() if "mismatched.safetensors" in line]
    assert len(mentions) == 1, proc.stderr
    assert "cannot start" in mentions[0] and "has shape" in mentions[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (160, 120), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


async def poll(condition, timeout: float = 60.0) -> None:
    """Poll a process from outside (no event to wait on), failing after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_sigterm_drains_admitted_requests_refuses_new_ones_and_exits_zero(weights, tmp_path):
    armed, entered, release = tmp_path / "armed", tmp_path / "entered", tmp_path / "release"
    port = free_port()
    env = server_env(weights, port, max_batch_size="2", drain_timeout_s="60")
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD_SERVER, str(armed), str(entered), str(release)],
        env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:

            async def ready_is(code: int) -> bool:
                try:
                    return (await client.get("/health/ready")).status_code == code
                except httpx.TransportError:
                    return False  # not listening yet

            async def held() -> bool:
                return entered.exists()

            async def two_queued() -> bool:
                return "yolov1_queue_depth 2.0" in (await client.get("/metrics")).text

            await poll(lambda: ready_is(200))
            armed.touch()

            def post() -> asyncio.Task:
                return asyncio.create_task(
                    client.post("/v1/detect", files={"image": ("a.jpg", jpeg())})
                )

            detect = [post()]
            await poll(held)  # the first request runs, held
            detect += [post(), post()]
            await poll(two_queued)  # two wait in the queue

            proc.send_signal(signal.SIGTERM)
            await poll(lambda: ready_is(503), timeout=10)
            refused = await client.post("/v1/detect", files={"image": ("b.jpg", jpeg())})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json() == {"detail": "service is draining for shutdown"}

            release.touch()
            answers = await asyncio.gather(*detect)
            assert [r.status_code for r in answers] == [200, 200, 200]
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate()
    assert "Traceback" not in stderr, stderr


def test_uvicorn_app_import_reads_settings_lazily(weights, monkeypatch):
    """``uvicorn app.main:app`` works; importing app.main alone builds nothing."""
    import app.main

    monkeypatch.setenv("YOLOV1_WEIGHTS", str(weights))
    app.main._default_app.cache_clear()
    try:
        assert app.main.app is app.main.app  # built once, on first access
        assert app.main.app.state.settings.weights == weights
    finally:
        app.main._default_app.cache_clear()


# Six threads allocate at once, then glibc's malloc_info counts the heaps (arenas) in use.
COUNT_ARENAS = """
import ctypes, re, sys, tempfile, threading
from app.service import limit_malloc_arenas
print(limit_malloc_arenas(2))
libc = ctypes.CDLL(None)
barrier, kept = threading.Barrier(6), []
def allocate():
    barrier.wait()
    kept.append([bytes(bytearray(50_000)) for _ in range(50)])
threads = [threading.Thread(target=allocate) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    out = ctypes.c_void_p(libc.fopen(f.name.encode(), b"w"))
    libc.malloc_info(0, out)
    libc.fclose(out)
    print(len(re.findall(r'<heap nr="[0-9]+">', open(f.name).read())))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
    reason="malloc arenas are glibc's",
)
@pytest.mark.parametrize("operator_value", [None, "8"])
def test_the_service_caps_malloc_arenas_unless_the_operator_chose(operator_value):
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if operator_value is not None:
        env["MALLOC_ARENA_MAX"] = operator_value
    done = subprocess.run(
        [sys.executable, "-c", COUNT_ARENAS], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    took_effect, heaps = done.stdout.split()
    if operator_value is None:
        assert (took_effect, int(heaps)) == ("True", 2)
    else:  # the operator's 8 stands: the six threads get heaps of their own
        assert took_effect == "False" and int(heaps) > 2
