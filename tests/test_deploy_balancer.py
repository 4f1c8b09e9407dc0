"""deploy/nginx/proxy.conf in a real nginx on loopback, in front of three replicas.

Stub replicas answer one way each (200, 503, 500, 504, a dropped connection, nobody
listening) and count what reaches them, so the tests see which requests nginx sent again; then
three real ``yolov1-serve`` processes, one of them full or draining, must lose no request.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from test_service_process import HELD_SERVER, free_port, jpeg, poll, server_env

REPO = Path(__file__).resolve().parents[1]
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx not installed (apt-get install nginx)")

NGINX_CONF = """
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream yolov1 {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location = /nginx-up {{ return 204; }}  # not proxied: probing must not mark a replica down
        include {repo}/deploy/nginx/proxy.conf;
    }}
}}
"""


def server_parameters() -> str:
    """The parameters compose's upstream gives its replicas (less ``resolve``)."""
    conf = (REPO / "deploy" / "nginx" / "default.conf").read_text()
    match = re.search(r"^\s*server replica:8000 resolve(.*);", conf, re.M)
    assert match, "no `server replica:8000 resolve ...;` in default.conf"
    return match.group(1)


def start_nginx(tmp: Path, upstream_ports: list[int]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    params = server_parameters()
    servers = "\n".join(f"        server 127.0.0.1:{p}{params};" for p in upstream_ports)
    user = "user root;" if os.geteuid() == 0 else ""  # workers must write tmp's body files
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, servers=servers, port=port, repo=REPO))
    proc = subprocess.Popen(
        [NGINX, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/nginx-up", timeout=1)
            break
        except httpx.TransportError:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- stub replicas ----------------------------------------------------------------------------

STATUS = {"ok": 200, "full": 503, "failed": 500, "deadline": 504}


class Stub:
    """A replica that answers every request the same way and counts those that reach it."""

    def __init__(self, mode: str):
        self.mode, self.hits = mode, Counter()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                stub.hits[self.command] += 1
                if stub.mode == "drop":  # read the request, then close without a word
                    return
                self.send_response(STATUS[stub.mode])
                self.send_header("Content-Type", "application/json")
                if stub.mode == "full":
                    self.send_header("Retry-After", "1")
                payload = f'{{"mode": "{stub.mode}", "bytes": {len(body)}}}'.encode()
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def balanced(tmp_path) -> Iterator:
    """``balanced(mode)``: nginx in front of a stub in ``mode`` and two that answer 200."""
    started: list = []

    def make(mode: str) -> tuple[str, Stub | None, list[Stub]]:
        good = [Stub("ok"), Stub("ok")]
        bad = None if mode == "refused" else Stub(mode)
        ports = [bad.port if bad else free_port()] + [s.port for s in good]
        proc, url = start_nginx(tmp_path, ports)
        started.extend([proc, bad, *good])
        return url, bad, good

    yield make
    for item in started:
        if isinstance(item, Stub):
            item.close()
        elif item is not None:
            stop(item)


REQUESTS = 30
BODY = os.urandom(300_000)


def send(url: str, method: str, n: int = REQUESTS) -> Counter:
    with httpx.Client(base_url=url, timeout=30) as client:
        if method == "POST":
            answers = [
                client.post("/v1/detect", files={"image": ("a.jpg", BODY)}) for _ in range(n)
            ]
        else:
            answers = [client.get("/v1/model") for _ in range(n)]
    return Counter(r.status_code for r in answers)


@pytest.mark.parametrize("method", ["POST", "GET"])
@pytest.mark.parametrize("mode", ["full", "refused"])
def test_a_replica_that_refuses_costs_no_request(balanced, mode, method):
    url, bad, good = balanced(mode)
    answers = send(url, method)
    assert answers == {200: REQUESTS}
    assert sum(s.hits[method] for s in good) == REQUESTS  # each answered once, by a good one
    if bad is not None:
        assert bad.hits[method] > 0, "the full replica was never tried: nothing was proven"


def test_when_every_replica_is_full_the_client_gets_their_503(tmp_path):
    stubs = [Stub("full") for _ in range(3)]
    proc, url = start_nginx(tmp_path, [s.port for s in stubs])
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            answers = [
                client.post("/v1/detect", files={"image": ("a.jpg", BODY)}) for _ in range(9)
            ]
    finally:
        stop(proc)
        for stub in stubs:
            stub.close()
    assert [(r.status_code, r.headers.get("retry-after")) for r in answers] == [(503, "1")] * 9
    assert [s.hits["POST"] for s in stubs] == [9, 9, 9]  # each request tried every replica once


@pytest.mark.parametrize("mode", ["failed", "deadline", "drop"])
def test_a_post_that_reached_a_replica_is_never_sent_twice(balanced, mode):
    url, bad, good = balanced(mode)
    answers = send(url, "POST")
    expected = {"failed": 500, "deadline": 504, "drop": 502}[mode]
    assert bad.hits["POST"] > 0
    # Every POST reached exactly one replica: the bad one's answers came back as they were.
    assert bad.hits["POST"] + sum(s.hits["POST"] for s in good) == REQUESTS
    assert answers == {200: REQUESTS - bad.hits["POST"], expected: bad.hits["POST"]}


def test_a_batch_upload_as_large_as_the_service_accepts_passes(balanced):
    """16 files of 10 MiB (the service's limits) in one request: nginx must not answer 413."""
    url, bad, good = balanced("full")
    files = [("images", (f"{i}.jpg", os.urandom(10 * 2**20))) for i in range(16)]
    with httpx.Client(base_url=url, timeout=120) as client:
        answer = client.post("/v1/detect/batch", files=files)
    assert answer.status_code == 200, answer.text
    assert answer.json()["bytes"] > 16 * 10 * 2**20


# ---- real replicas ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.timeout(300)
@pytest.mark.parametrize("trouble", ["full", "draining"])
async def test_three_replicas_one_full_or_draining_lose_no_request(weights, tmp_path, trouble):
    """Three ``yolov1-serve`` processes behind nginx; one holds its worker in a batch and is
    either full (its one queue slot taken) or draining (SIGTERM): every request is answered
    200 by the other two, and the troubled one's 503s show nginx really sent requests there."""
    # The troubled replica has room for one running and one queued image; the others have the
    # defaults.
    tiny = dict(max_batch_size="1", max_images_per_request="1", max_queue="1")
    procs, ports = [], []
    for i in range(3):
        armed, entered, release = (tmp_path / f"{name}{i}" for name in ("armed", "in", "go"))
        ports.append(free_port())
        env = server_env(weights, ports[-1], drain_timeout_s="120", **(tiny if i == 0 else {}))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", HELD_SERVER, str(armed), str(entered), str(release)],
                env=env,
                cwd=tmp_path,
                text=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
        )
    nginx = None
    held: list[asyncio.Task] = []
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            for port in ports:

                async def ready(port: int = port) -> bool:
                    try:
                        r = await client.get(f"http://127.0.0.1:{port}/health/ready")
                        return r.status_code == 200
                    except httpx.TransportError:
                        return False

                await poll(ready, timeout=120)
            # Replica 0 gets into trouble: one request held in its batch, and then...
            bad = f"http://127.0.0.1:{ports[0]}"
            (tmp_path / "armed0").touch()
            held.append(asyncio.create_task(_detect(client, bad)))
            await poll(lambda: _exists(tmp_path / "in0"))
            if trouble == "full":  # ...its one queue slot taken
                held.append(asyncio.create_task(_detect(client, bad)))
                await poll(lambda: _metric(client, bad, "yolov1_queue_depth 1.0"))
            else:  # ...or SIGTERM: it drains, answering 503 to anything new
                procs[0].send_signal(signal.SIGTERM)
                await poll(lambda: _not_ready(client, bad), timeout=10)
            assert (await _detect(client, bad)).status_code == 503
            before = await _rejections(client, bad)

            nginx, url = start_nginx(tmp_path, ports)
            start = time.perf_counter()
            answers = []
            for _ in range(8):  # 8 waves of 6 concurrent requests
                wave = [_detect(client, url) for _ in range(6)]
                answers += await asyncio.gather(*wave)
            elapsed = time.perf_counter() - start
            codes = Counter(r.status_code for r in answers)
            refused = await _rejections(client, bad) - before
            print(f"\n{trouble}: {dict(codes)} in {elapsed:.2f} s; {refused} sent to the "
                  "troubled replica first and retried")  # fmt: skip
            assert codes == {200: len(answers)}
            assert refused >= 1, "nginx never tried the troubled replica: nothing was proven"
            (tmp_path / "go0").touch()
            assert all(r.status_code == 200 for r in await asyncio.gather(*held))
    finally:
        (tmp_path / "go0").touch()
        if nginx is not None:
            stop(nginx)
        for proc in procs:
            stop(proc)


async def _detect(client: httpx.AsyncClient, url: str) -> httpx.Response:
    return await client.post(f"{url}/v1/detect", files={"image": ("a.jpg", jpeg())})


async def _exists(path: Path) -> bool:
    return path.exists()


async def _metric(client: httpx.AsyncClient, url: str, line: str) -> bool:
    return line in (await client.get(f"{url}/metrics")).text


async def _not_ready(client: httpx.AsyncClient, url: str) -> bool:
    return (await client.get(f"{url}/health/ready")).status_code == 503


async def _rejections(client: httpx.AsyncClient, url: str) -> float:
    text = (await client.get(f"{url}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("yolov1_rejections_total{")
        and ('reason="queue_full"' in line or 'reason="draining"' in line)
    )
