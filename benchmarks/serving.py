"""Service throughput and latency against the model in process and a naive per-request server.

    python -m benchmarks.serving (--weights W | --arch yolov1 [--image-size 448]) [--device cpu]
        [--requests 128] [--concurrency 1,4,16,64] [--out bench-results/x.json]

1. In process, for each backend: forward only, and end to end (JPEG decode + resize + forward +
   postprocess, with the service's own functions) at each batch size -> images/s.
2. The service (``uvicorn app.main:app`` in a subprocess on a free loopback port), driven over
   HTTP with httpx at each concurrency for a fixed number of requests -> images/s, p50/p95/p99
   latency, mean batch size (from ``/metrics``), peak RSS under load; plus a large-photo row
   (a 4000x3000 JPEG).
3. The same against ``benchmarks.naive_server`` (one model call per request in the handler).
4. One table per part, the ratios and the targets as PASS/FAIL lines; the raw numbers as JSON.

Request counts are fixed, so two runs do the same work; every HTTP level is bounded by
``--level-timeout-s`` and a level that runs out of time is reported as such. Nothing here
asserts on time: the targets are printed, never raised.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import itertools
import json
import logging
import math
import operator
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from app.backends import Backend, create_backend, resolve_backend_name, resolve_device
from app.inference import Detector, Job, decode_image, to_pixels
from app.settings import DEFAULT_WEIGHTS
from benchmarks.decode import LARGE_SIZE, format_decode, make_large_jpeg, time_decode
from benchmarks.naive_server import MAX_IMAGE_PIXELS, default_options
from model import ARCHITECTURES, VOC_CLASSES, build_model, load_checkpoint, save_checkpoint
from model.metadata import file_sha256, read_metadata

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = REPO_ROOT.parent / "shared" / "images"
MB = 1024 * 1024
LARGE_CONCURRENCY = 4  # the large-photo row; compare it with the c4 row of small photos

# The targets on this CPU.
TARGET_THROUGHPUT_RATIO = 0.9  # service c16 / in-process best end to end, at least
TARGET_LATENCY_RATIO = 1.15  # service c1 p50 / in-process one-image end to end, at most
TARGET_P99_RATIO = 0.5  # service c16 p99 / naive c16 p99, at most
MEMORY_ALLOWANCE_BYTES = 600 * MB  # on top of 2 x the float32 weights
COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
}  # fmt: skip


# ---- inputs ---------------------------------------------------------------------------------


def load_jpegs(directory: Path) -> list[tuple[str, bytes]]:
    """The ``*.jpg`` files of ``directory`` as (name, bytes), sorted by name; exits if none."""
    if not directory.is_dir():
        sys.exit(
            f"benchmarks.serving: no image folder at {directory}; it holds the real JPEGs the "
            "benchmark uploads (../shared/images beside the repository), or pass --images DIR"
        )
    files = sorted(directory.glob("*.jpg"))
    if not files:
        sys.exit(f"benchmarks.serving: no *.jpg files in {directory}; pass --images DIR")
    return [(f.name, f.read_bytes()) for f in files]


def random_checkpoint(arch: str, image_size: int, directory: Path) -> Path:
    """Save a seeded, randomly initialised ``arch`` (VOC classes): speed needs no training."""
    torch.manual_seed(0)
    model = build_model(arch, image_size=image_size)
    path = directory / f"{arch}-{image_size}-random.safetensors"
    return save_checkpoint(path, model, {"class_names": list(VOC_CLASSES)})


def add_checkpoint_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """``--weights W`` or ``--arch A [--image-size N]`` (random weights): what is served."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--weights", type=Path, help=f"checkpoint (default: {DEFAULT_WEIGHTS})")
    which.add_argument(
        "--arch", choices=sorted(ARCHITECTURES), help=f"{verb} it with random weights instead"
    )
    parser.add_argument("--image-size", type=int, default=448, help="input size for --arch")


def checkpoint_from_args(args: argparse.Namespace, directory: Path, prog: str) -> Path:
    """The checkpoint ``add_checkpoint_arguments`` asked for; a random one goes to ``directory``.

    Exits with a message naming ``prog`` when the --weights file (or the default) is missing.
    """
    if args.arch is not None:
        return random_checkpoint(args.arch, args.image_size, directory)
    weights = args.weights or DEFAULT_WEIGHTS
    if not weights.is_file():
        sys.exit(f"{prog}: no checkpoint at {weights}; pass --weights or --arch")
    return weights


def float32_bytes(model: torch.nn.Module) -> int:
    """Size of the model's floating-point weights and buffers if stored as float32."""
    return sum(4 * t.numel() for t in model.state_dict().values() if t.is_floating_point())


def describe_machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# ---- 1. in process --------------------------------------------------------------------------


def _timed_calls(call: Callable[[int], object], calls: int) -> tuple[list[float], float]:
    """Seconds per call of ``call(i)`` for i in range(calls), after one untimed warm-up call,
    and the CPU seconds the whole process used meanwhile (all threads)."""
    call(0)
    times = []
    cpu = time.process_time()
    for i in range(calls):
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
    return times, time.process_time() - cpu


def _forward(backend: Backend, images: torch.Tensor, _: int) -> None:
    backend.forward(images)  # the grid comes back to the host: on CUDA, that synchronises


def _end_to_end(detector: Detector, jpegs: list[bytes], batch_size: int, i: int) -> None:
    """Batch ``i`` of the service's path minus HTTP and the batcher, in one thread."""
    uploads = [jpegs[(i * batch_size + k) % len(jpegs)] for k in range(batch_size)]
    decoded = [decode_image(data, detector.image_size, MAX_IMAGE_PIXELS) for data in uploads]
    options = default_options(detector)
    found = detector([Job(d.pixels, options) for d in decoded])
    for d, f in zip(decoded, found, strict=True):
        to_pixels(f.boxes, d.width, d.height)


def time_in_process(
    weights: Path,
    device: str,
    backends: list[str],
    batch_sizes: list[int],
    jpegs: list[bytes],
    images_per_row: int,
    precision: str = "auto",
    calibration_data: list[Path] | None = None,
) -> list[dict[str, Any]]:
    """Forward only and end to end, per backend and batch size; one dict per row.

    ``precision`` applies to the onnxruntime backend (the torch one computes in float32).

    End to end is ``decode_image`` per JPEG (draft mode included), ``Detector`` (stack,
    forward, postprocess per image) and ``to_pixels``: what the service does to a batch.
    """
    metadata = read_metadata(weights)
    size = metadata["image_size"]
    rows = []
    # Timed on a worker thread, as the service runs its batches and decodes. On the main thread
    # of a busy 2-core machine, torch's OpenMP team made small element-wise ops (the uint8 to
    # float of a decoded image) ~100x slower, which would flatter the service.
    worker = ThreadPoolExecutor(1, thread_name_prefix="bench")
    for name in backends:
        backend = create_backend(
            name, weights, metadata, device, calibration_data=calibration_data or (),
            precision=precision if name == "onnxruntime" else "fp32",
        )  # fmt: skip
        detector = Detector(backend, metadata, weights, version="benchmark")
        for batch_size in batch_sizes:
            calls = max(2, math.ceil(images_per_row / batch_size))
            images = torch.rand(batch_size, 3, size, size, device=torch.device(backend.device))
            for mode, call in (
                ("forward", partial(_forward, backend, images)),
                ("end_to_end", partial(_end_to_end, detector, jpegs, batch_size)),
            ):
                row = {
                    "backend": name,
                    "device": backend.device,  # onnxruntime may fall back to the CPU
                    "dtype": backend.dtype,
                    "mode": mode,
                    "batch_size": batch_size,
                    **_throughput(batch_size, *worker.submit(_timed_calls, call, calls).result()),
                }
                logger.info(
                    "in process %s %s batch %d: %.2f img/s",
                    name, mode, batch_size, row["images_per_s"],
                )  # fmt: skip
                rows.append(row)
    worker.shutdown()
    return rows


def _throughput(batch_size: int, times: list[float], cpu_s: float) -> dict[str, float]:
    images = batch_size * len(times)
    return {
        "images": images,
        "seconds": sum(times),
        "images_per_s": images / sum(times),
        "batch_ms_p50": statistics.median(times) * 1000,
        "cpu_ms_per_image": 1000 * cpu_s / images,
    }


# ---- 2./3. servers over HTTP ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_status_bytes(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """The ``keys`` (kB fields such as VmHWM) of /proc/<pid>/status, in bytes; {} off Linux."""
    values = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.partition(":")[0]
            if key in keys:
                values[key] = int(line.split()[1]) * 1024
    return values


def read_peak_rss(pid: int) -> int | None:
    """Peak resident set size of ``pid`` in bytes (VmHWM); psutil's RSS where /proc is absent."""
    if peak := _proc_status_bytes(pid, ("VmHWM",)).get("VmHWM"):
        return peak
    try:
        import psutil  # optional; only where /proc is absent
    except ImportError:
        return None
    info = psutil.Process(pid).memory_info()
    return getattr(info, "peak_wset", info.rss)  # a peak on Windows, the current RSS elsewhere


def read_rss_parts(pid: int) -> dict[str, int]:
    """Current ``RssAnon``/``RssFile``/``RssShmem`` of ``pid`` in bytes (Linux; else empty).

    File-backed pages are mostly the shared libraries (libtorch alone is hundreds of MB), so
    they say how much of the peak is code rather than the model and the queue.
    """
    return _proc_status_bytes(pid, ("RssAnon", "RssFile", "RssShmem"))


def read_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds ``pid`` has used so far (Linux; else None)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def reset_peak_rss(pid: int) -> bool:
    """Reset ``pid``'s VmHWM to its current RSS (Linux), so the peak covers what follows."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def parse_batch_size(metrics_text: str) -> tuple[float, float]:
    """``(yolov1_batch_size_sum, yolov1_batch_size_count)`` from Prometheus text."""
    values = {}
    for line in metrics_text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("yolov1_batch_size_sum", "yolov1_batch_size_count"):
            values[name] = float(value)
    if len(values) != 2:
        raise ValueError("no yolov1_batch_size histogram in the /metrics text")
    return values["yolov1_batch_size_sum"], values["yolov1_batch_size_count"]


def latency_summary(latencies_s: list[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    p50, p95, p99 = np.percentile(np.array(latencies_s) * 1000, [50, 95, 99]).tolist()
    return {"p50": p50, "p95": p95, "p99": p99, "mean": 1000 * statistics.fmean(latencies_s)}


class Server:
    """A server subprocess on a loopback port, its log in a file; stopped with SIGTERM."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log: Path):
        self.name = name
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float) -> None:
        """Poll ``/health/ready`` until 200; exit with the log's tail if the server dies first."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    self.fail(f"exited with status {self.process.returncode} while starting")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/health/ready").status_code == 200:
                        return
                time.sleep(0.2)
        self.fail(f"not ready after {timeout_s:g} s")

    def fail(self, why: str) -> None:
        self.stop()
        tail = self.log.read_text(errors="replace").splitlines()[-20:]
        ends = "\n".join(tail)
        sys.exit(f"benchmarks.serving: the {self.name} server {why}; its log ends:\n{ends}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()


async def drive(
    client: httpx.AsyncClient,
    uploads: list[bytes],
    requests: int,
    concurrency: int,
    timeout_s: float,
    label: str,
) -> dict[str, Any]:
    """Send ``requests`` POST /v1/detect, ``concurrency`` at a time, cycling through ``uploads``.

    Returns the counts by status, images/s over the wall time of the level and the latency of
    the successful requests. Requests still open after ``timeout_s`` are cancelled.
    """
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    numbers = itertools.count()
    progress = tqdm(total=requests, desc=label, leave=False, disable=None)

    async def worker() -> None:
        while (i := next(numbers)) < requests:
            files = {"image": (f"{i}.jpg", uploads[i % len(uploads)], "image/jpeg")}
            start = time.perf_counter()
            try:
                status = str((await client.post("/v1/detect", files=files)).status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            if status == "200":
                latencies.append(time.perf_counter() - start)
            statuses[status] += 1
            progress.update()

    start = time.perf_counter()
    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    seconds = time.perf_counter() - start
    progress.close()
    return {
        "concurrency": concurrency,
        "requests": requests,
        "ok": statuses["200"],
        "statuses": dict(statuses),
        "timed_out": bool(pending),
        "seconds": seconds,
        "images_per_s": statuses["200"] / seconds,
        "latency_ms": latency_summary(latencies),
    }


async def _metrics_batch(client: httpx.AsyncClient, has_metrics: bool) -> tuple[float, float]:
    if not has_metrics:
        return 0.0, 0.0
    response = await client.get("/metrics")
    response.raise_for_status()
    return parse_batch_size(response.text)


async def load_server(
    server: Server,
    uploads: list[bytes],
    large: bytes,
    concurrency: list[int],
    requests: int,
    large_requests: int,
    timeout_s: float,
    has_metrics: bool,
) -> dict[str, Any]:
    """Warm up, reset the peak RSS, then run every load level; one dict per level."""
    limits = httpx.Limits(max_connections=max(concurrency + [LARGE_CONCURRENCY]))
    async with httpx.AsyncClient(
        base_url=server.base_url, timeout=timeout_s, limits=limits
    ) as client:
        model_info = (await client.get("/v1/model")).json()
        # A few requests first, so no level pays first-connection or first-call costs.
        await drive(client, uploads + [large], len(uploads) + 1, 1, timeout_s, "warm-up")
        startup_peak = read_peak_rss(server.pid)
        reset = reset_peak_rss(server.pid)
        # At least one request per client, so that "c64" means 64 requests in flight.
        levels = [(f"c{c}", c, uploads, max(requests, c)) for c in concurrency]
        levels.append((f"large c{LARGE_CONCURRENCY}", LARGE_CONCURRENCY, [large], large_requests))
        rows = []
        for load, c, payloads, n in levels:
            before = await _metrics_batch(client, has_metrics)
            server_cpu, client_cpu = read_cpu_seconds(server.pid), time.process_time()
            row = await drive(client, payloads, n, c, timeout_s, f"{server.name} {load}")
            client_cpu = time.process_time() - client_cpu
            server_cpu = _delta(server_cpu, read_cpu_seconds(server.pid))
            after = await _metrics_batch(client, has_metrics)
            batches = after[1] - before[1]
            mean_batch = (after[0] - before[0]) / batches if batches else None
            # CPU seconds per answered image: on a small machine the client's share is taken
            # from the server, which the in-process rows never pay.
            ok = max(row["ok"], 1)
            rows.append(
                {
                    "load": load,
                    **row,
                    "mean_batch_size": mean_batch,
                    "server_cpu_ms_per_image": server_cpu and 1000 * server_cpu / ok,
                    "client_cpu_ms_per_image": 1000 * client_cpu / ok,
                }
            )
            logger.info(
                "%s %s: %.2f img/s, p50 %s ms, mean batch %s",
                server.name, load, row["images_per_s"], _fmt(row["latency_ms"]["p50"]),
                _fmt(mean_batch, 2),
            )  # fmt: skip
    return {
        "model": model_info,
        "peak_rss_bytes": read_peak_rss(server.pid),
        "rss_parts_after_load_bytes": read_rss_parts(server.pid),
        "peak_rss_covers": "load only" if reset else "startup and load",
        "startup_peak_rss_bytes": startup_peak,
        "rows": rows,
    }


@contextlib.contextmanager
def running(
    name: str, command: list[str], env: dict[str, str], port: int, log: Path, timeout_s: float
) -> Iterator[Server]:
    server = Server(name, command, env, port, log)
    try:
        server.wait_ready(timeout_s)
        yield server
    finally:
        server.stop()


def server_commands(
    args: argparse.Namespace, weights: Path, port: int
) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Command and environment of each server: the service, then the naive one."""
    # The children get this environment plus their settings (PATH, the venv, thread counts).
    base_env = dict(os.environ)
    if args.threads is not None:
        base_env["OMP_NUM_THREADS"] = str(args.threads)
    service_env = {
        **base_env,
        "YOLOV1_WEIGHTS": str(weights),
        "YOLOV1_DEVICE": args.device,
        "YOLOV1_BACKEND": args.service_backend,
        "YOLOV1_PRECISION": args.precision,
        **calibration_env(args),
        **{f"YOLOV1_{key.upper()}": value for key, value in args.set},
    }
    return {
        "service": (
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
             "--port", str(port), "--no-access-log"],
            service_env,
        ),
        "naive": (
            [sys.executable, "-m", "benchmarks.naive_server", "--weights", str(weights),
             "--device", args.device, "--backend", args.naive_backend or args.service_backend,
             "--port", str(port), "--precision", args.precision,
             *(["--calibration-data", *map(str, args.calibration_data)]
               if args.calibration_data else [])],
            base_env,
        ),
    }  # fmt: skip


def calibration_env(args: argparse.Namespace) -> dict[str, str]:
    """YOLOV1_CALIBRATION_DATA for --calibration-data (int8 of weights without training data)."""
    if not args.calibration_data:
        return {}
    return {"YOLOV1_CALIBRATION_DATA": ",".join(str(p) for p in args.calibration_data)}


def bench_servers(
    args: argparse.Namespace, weights: Path, uploads: list[bytes], large: bytes, workdir: Path
) -> dict[str, Any]:
    """The service and the naive server, one after the other, under the same loads."""
    results = {}
    for name in ("service", "naive"):
        port = free_port()
        command, env = server_commands(args, weights, port)[name]
        logger.info("starting the %s server on port %d", name, port)
        log = workdir / f"{name}.log"
        with running(name, command, env, port, log, args.startup_timeout_s) as server:
            results[name] = asyncio.run(
                load_server(
                    server, uploads, large, args.concurrency, args.requests,
                    args.large_requests, args.level_timeout_s, has_metrics=name == "service",
                )
            )  # fmt: skip
    return results


# ---- 4. ratios, targets, tables -------------------------------------------------------------


def _level(results: dict[str, Any], server: str, load: str) -> dict[str, Any] | None:
    rows = results["servers"].get(server, {}).get("rows", [])
    return next((r for r in rows if r["load"] == load and r["ok"]), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def evaluate(results: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ratios, and each target as ``{"target", "value", "limit", "passed"}``.

    ``passed`` is None where the run lacks the rows (a concurrency or a server not measured).
    """
    e2e = [r for r in results["in_process"] if r["mode"] == "end_to_end"]
    best = max(e2e, key=lambda r: r["images_per_s"], default=None)
    single = min(
        (r for r in e2e if r["batch_size"] == 1), key=lambda r: r["batch_ms_p50"], default=None
    )
    c1, c16, c64 = (_level(results, "service", c) for c in ("c1", "c16", "c64"))
    naive16 = _level(results, "naive", "c16")
    tput = lambda row: row["images_per_s"] if row else None  # noqa: E731
    p = lambda row, q: row["latency_ms"][q] if row else None  # noqa: E731

    service = results["servers"].get("service", {})
    weights_fp32 = results["meta"]["weights_fp32_bytes"]
    memory_limit = 2 * weights_fp32 + MEMORY_ALLOWANCE_BYTES
    ratios = {
        "inprocess_best_e2e": best and {k: best[k] for k in ("backend", "batch_size")},
        "inprocess_single_e2e": single and {"backend": single["backend"]},
        "service_c16_over_inprocess_best_e2e": _ratio(tput(c16), tput(best)),
        "service_c1_p50_over_inprocess_single_e2e": _ratio(
            p(c1, "p50"), single and single["batch_ms_p50"]
        ),
        "service_over_naive_c16_throughput": _ratio(tput(c16), tput(naive16)),
        "service_over_naive_c16_p99": _ratio(p(c16, "p99"), p(naive16, "p99")),
        "service_c64_over_inprocess_bs1_e2e": _ratio(tput(c64), tput(single)),
        "service_peak_rss_over_limit": _ratio(service.get("peak_rss_bytes"), memory_limit),
    }

    def target(text: str, value: float | None, op: str, limit: float) -> dict[str, Any]:
        passed = None if value is None else COMPARE[op](value, limit)
        return {"target": text, "value": value, "op": op, "limit": limit, "passed": passed}

    rss = service.get("peak_rss_bytes")
    targets = [
        target(
            "service c16 img/s / in-process best end-to-end img/s",
            ratios["service_c16_over_inprocess_best_e2e"], ">=", TARGET_THROUGHPUT_RATIO,
        ),
        target(
            "service c1 p50 / in-process one-image end-to-end time",
            ratios["service_c1_p50_over_inprocess_single_e2e"], "<=", TARGET_LATENCY_RATIO,
        ),
        target(
            "service c16 img/s / naive c16 img/s",
            ratios["service_over_naive_c16_throughput"], ">", 1.0,
        ),
        target(
            "service c16 p99 / naive c16 p99",
            ratios["service_over_naive_c16_p99"], "<=", TARGET_P99_RATIO,
        ),
        target(
            f"service peak RSS under load, MB (2 x {weights_fp32 / MB:.0f} MB fp32 weights + 600)",
            rss / MB if rss else None, "<", memory_limit / MB,
        ),
    ]  # fmt: skip
    return ratios, targets


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(results: dict[str, Any]) -> str:
    """The in-process, decode and HTTP tables, the ratios and the targets, as markdown."""
    meta = results["meta"]
    lines = [
        f"## {meta['arch']} at {meta['image_size']} px on {meta['device']} "
        f"({meta['machine']['cpu']}, {meta['machine']['torch_threads']} threads), "
        f"{meta['date']}",
        "",
    ]
    batch_sizes = sorted({r["batch_size"] for r in results["in_process"]})
    lines += [
        "| in process, img/s | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |",
        "|---|" + "---:|" * len(batch_sizes),
    ]
    keys = dict.fromkeys((r["backend"], r["mode"]) for r in results["in_process"])
    for backend, mode in keys:
        cells = {
            r["batch_size"]: r["images_per_s"]
            for r in results["in_process"]
            if (r["backend"], r["mode"]) == (backend, mode)
        }
        row = " | ".join(_fmt(cells.get(b)) for b in batch_sizes)
        dtype = next(r.get("dtype") for r in results["in_process"] if r["backend"] == backend)
        tag = f" ({dtype})" if dtype == "int8" else ""
        lines.append(f"| {backend}{tag} {mode.replace('_', ' ')} | {row} |")
    if results.get("decode"):
        lines += ["", format_decode(results["decode"])]
    lines += [
        "",
        "| server | load | ok/sent | img/s | p50 ms | p95 ms | p99 ms | mean batch "
        "| CPU ms/img server + client | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, server in results["servers"].items():
        rss = server["peak_rss_bytes"] / MB if server["peak_rss_bytes"] else None
        model = server["model"]
        int8 = " int8" if model.get("dtype") == "int8" else ""
        label = f"{name} ({model.get('backend', '?')}{int8})"
        for row in server["rows"]:
            lat = row["latency_ms"]
            lines.append(
                f"| {label} | {row['load']}{' (timed out)' if row['timed_out'] else ''} | "
                f"{row['ok']}/{row['requests']} | {_fmt(row['images_per_s'])} | "
                f"{_fmt(lat['p50'])} | {_fmt(lat['p95'])} | {_fmt(lat['p99'])} | "
                f"{_fmt(row['mean_batch_size'], 2)} | {_fmt(row['server_cpu_ms_per_image'], 0)} + "
                f"{_fmt(row['client_cpu_ms_per_image'], 0)} | {_fmt(rss, 0)} |"
            )
    ratios = results["ratios"]
    best, single = ratios["inprocess_best_e2e"], ratios["inprocess_single_e2e"]
    lines += ["", "Ratios:"]
    if best:
        where = f"{best['backend']} at batch {best['batch_size']}"
        lines.append(f"- in-process best end to end: {where}")
    if single:
        lines.append(f"- in-process one image end to end: {single['backend']}")
    for key, value in ratios.items():
        if not key.startswith("inprocess"):
            lines.append(f"- {key}: {_fmt(value, 2)}")
    lines += ["", "Targets:"]
    for t in results["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[t["passed"]]
        value, target = _fmt(t["value"], 2), f"{t['op']} {t['limit']:.4g}"
        lines.append(f"{verdict} {t['target']}: {value} (target {target})")
    lines.append("")
    for name, server in results["servers"].items():
        parts = server["rss_parts_after_load_bytes"]
        if parts:
            split = ", ".join(f"{key[3:].lower()} {value / MB:.0f}" for key, value in parts.items())
            lines.append(f"{name} RSS after the load, MB: {split}")
        if server["peak_rss_covers"] != "load only":
            lines.append(f"note: the {name} peak RSS includes startup (VmHWM could not be reset)")
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,16, got {text!r}")
    return values


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) and int(height)):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 4000x3000, got {text!r}")
    return int(width), int(height)


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. MAX_WAIT_MS=5), got {text!r}")
    return key.removeprefix("YOLOV1_").upper(), value


def add_setting_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE`` (repeatable): a service setting passed as ``YOLOV1_KEY``."""
    parser.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"service setting, as YOLOV1_KEY (repeatable), e.g. --set {example}",
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_checkpoint_arguments(parser, "benchmark")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument(
        "--images", type=Path, default=IMAGES_DIR, help="folder of real JPEGs to upload"
    )
    parser.add_argument(
        "--backends", default="torch,onnxruntime", help="in-process backends, comma-separated"
    )
    parser.add_argument("--batch-sizes", type=_int_list, default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--inproc-images", type=int, default=32, help="images per in-process row (>= 2 batches)"
    )
    parser.add_argument("--concurrency", type=_int_list, default=[1, 4, 16, 64])
    parser.add_argument(
        "--requests", type=int, default=128, help="requests per concurrency (at least c)"
    )
    parser.add_argument(
        "--large-requests", type=int, default=16, help="requests of the 4000x3000 photo row"
    )
    parser.add_argument(
        "--large-size", type=_size, default=LARGE_SIZE, help="the large photo, WxH (4000x3000)"
    )
    parser.add_argument("--decode-repeats", type=int, default=5, help="0 skips the decode table")
    parser.add_argument(
        "--service-backend", default="auto", choices=("auto", "torch", "onnxruntime")
    )
    parser.add_argument(
        "--naive-backend",
        choices=("auto", "torch", "onnxruntime"),
        help="backend of the naive server (default: the service's, so only serving differs)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "int8"),
        default="auto",
        help="of the onnxruntime engine, in process and in both servers (YOLOV1_PRECISION)",
    )
    parser.add_argument(
        "--calibration-data",
        nargs="+",
        type=Path,
        help="int8: calibration folders (default: the checkpoint's training data; with --arch, "
        "../shared/datasets/voc2007_subset)",
    )
    add_setting_argument(parser, "MAX_WAIT_MS=5")
    parser.add_argument("--threads", type=int, help="CPU threads for torch/onnxruntime")
    parser.add_argument("--startup-timeout-s", type=float, default=600)
    parser.add_argument(
        "--level-timeout-s", type=float, default=300, help="time bound of each HTTP load level"
    )
    parser.add_argument("--out", type=Path, help="raw JSON (default: bench-results/<arch>-...)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    for noisy in ("httpx", "onnxscript", "onnx_ir"):  # a line per request or per export pass
        logging.getLogger(noisy).setLevel(logging.WARNING)
    jpegs = load_jpegs(args.images)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for name in backends:
        resolve_backend_name(name, device)  # ValueError names a bad backend before any work

    with tempfile.TemporaryDirectory(prefix="yolov1-bench-") as tmp:
        workdir = Path(tmp)
        weights = checkpoint_from_args(args, workdir, "benchmarks.serving")
        model, metadata = load_checkpoint(weights)
        meta = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": describe_machine(device),
            "arch": metadata["arch"],
            "image_size": metadata["image_size"],
            "weights": str(weights) if args.arch is None else f"random {args.arch}",
            "weights_sha256": file_sha256(weights),
            "weights_fp32_bytes": float32_bytes(model),
            "device": device,
            "images": [name for name, _ in jpegs],
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        del model
        uploads = [data for _, data in jpegs]
        large = make_large_jpeg(uploads[0], args.large_size)
        (workdir / "large.jpg").write_bytes(large)

        logger.info("in process: %s at batch sizes %s", backends, args.batch_sizes)
        if args.arch is not None and not args.calibration_data:
            args.calibration_data = [REPO_ROOT.parent / "shared" / "datasets" / "voc2007_subset"]
        in_process = time_in_process(
            weights, device, backends, args.batch_sizes, uploads, args.inproc_images,
            args.precision, args.calibration_data,
        )  # fmt: skip
        decode = (
            time_decode(large, metadata["image_size"], args.decode_repeats)
            if args.decode_repeats
            else None
        )
        gc.collect()
        servers = bench_servers(args, weights, uploads, large, workdir)

    results: dict[str, Any] = {
        "meta": meta,
        "in_process": in_process,
        "decode": decode,
        "servers": servers,
    }
    results["ratios"], results["targets"] = evaluate(results)
    print(format_report(results))
    write_results(
        results, args.out, f"{meta['arch']}-{meta['image_size']}-{device.partition(':')[0]}"
    )
    return results


def write_results(results: dict[str, Any], out: Path | None, prefix: str) -> Path:
    """Write the raw numbers as JSON (default: bench-results/<prefix>-<time>.json)."""
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out = out or REPO_ROOT / "bench-results" / f"{prefix}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nraw numbers: {out}")
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
