"""Soak: the service under a steady mix of good and hostile uploads, with its memory sampled.

    python -m benchmarks.soak [--duration 600] [--concurrency 8] [--weights W | --arch yolov1-tiny
        [--image-size 448]] [--images ../shared/images] [--sample-every 5] [--set KEY=VALUE]
        [--out bench-results/soak-....json]

Starts ``yolov1-serve`` (uvicorn, SIGTERM draining) in a subprocess on a free loopback port
with its default settings, then ``--concurrency`` clients send requests until ``--duration``
seconds have passed. Seven requests in ten upload a real JPEG from ``--images``; the others
are hostile: random bytes, a truncated JPEG, a PNG whose header declares 100000 x 100000
pixels, a GIF, a text file named ``.jpg`` and an upload over the byte limit. The server's RSS
is read from /proc every ``--sample-every`` seconds. At the end the server gets SIGTERM.

Prints the answers by input kind and status, the RSS at start / peak / end, the p50 / p99
latency of the good requests, and the server's exit status; writes everything as JSON.
Nothing here asserts: an unexpected answer is counted and reported.

The upload over the byte limit is refused from its Content-Length before it is read. Clients
that read a response while they send (curl) get the 413; httpx writes the whole body first and
reports the closed connection instead (encode/httpx#878), so that kind expects 413 or
ReadError/WriteError.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import itertools
import logging
import os
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from struct import pack
from typing import Any

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

from app.backends import resolve_device
from app.settings import Settings
from benchmarks.serving import (
    IMAGES_DIR,
    Server,
    add_checkpoint_arguments,
    add_setting_argument,
    checkpoint_from_args,
    describe_machine,
    free_port,
    latency_summary,
    load_jpegs,
    read_peak_rss,
    read_rss_parts,
    write_results,
)
from model.checkpoint import file_sha256, read_metadata

logger = logging.getLogger(__name__)

MB = 1024 * 1024
# One cycle of request kinds: 14 good in 20, then one of each hostile kind.
MIX = ("good",) * 14 + ("random", "truncated", "bomb", "gif", "text", "oversize")
EXPECTED: dict[str, set[str]] = {  # kind -> the answers that are right for it
    "good": {"200"},
    "random": {"415"},
    "truncated": {"400"},
    "bomb": {"413"},
    "gif": {"415"},
    "text": {"415"},
    "oversize": {"413", "ReadError", "WriteError"},  # see the module docstring
}
SHED = {"503"}  # overload shedding: reported, not an error


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` over one byte of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return pack(">I", len(data)) + kind + data + pack(">I", zlib.crc32(kind + data))

    ihdr = pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))  # fmt: skip


def hostile_uploads(jpeg: bytes, upload_limit: int) -> dict[str, tuple[str, bytes, str]]:
    """The bad inputs as (filename, bytes, content type), built once."""
    gif = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 128, 255)).save(gif, "GIF")
    return {
        "random": ("random.jpg", np.random.default_rng(0).bytes(64 * 1024), "image/jpeg"),
        "truncated": ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"),
        "bomb": ("bomb.png", png_declaring(100_000, 100_000), "image/png"),
        "gif": ("x.gif", gif.getvalue(), "image/gif"),
        "text": ("notes.jpg", b"not an image, whatever the name says\n" * 100, "image/jpeg"),
        "oversize": ("huge.jpg", b"\xff" * (upload_limit + MB), "image/jpeg"),
    }


def rss_sample(t_s: float, pid: int) -> dict[str, float | None]:
    """``pid``'s resident set now (Linux): in all, and its anonymous part (heap, tensors).

    The rest is mostly file-backed pages of the shared libraries (libtorch alone is hundreds of
    MB), which do not grow with traffic; a leak shows in the anonymous part.
    """
    parts = read_rss_parts(pid)
    return {
        "t_s": round(t_s, 1),
        "rss_bytes": sum(parts.values()) if parts else None,
        "anon_bytes": parts.get("RssAnon"),
    }


async def soak(
    server: Server,
    jpegs: list[tuple[str, bytes]],
    hostile: dict[str, tuple[str, bytes, str]],
    args: argparse.Namespace,
    headers: dict[str, str],
) -> dict[str, Any]:
    """Drive the server for ``args.duration`` seconds; answers, latencies and RSS samples."""
    answers: defaultdict[str, Counter[str]] = defaultdict(Counter)
    good_latency_s: list[float] = []
    numbers = itertools.count()
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(
        base_url=server.base_url, timeout=args.request_timeout_s, limits=limits, headers=headers
    ) as client:
        for name, data in jpegs:  # warm up: first-call costs are not part of the soak
            (
                await client.post("/v1/detect", files={"image": (name, data, "image/jpeg")})
            ).raise_for_status()
        samples = [rss_sample(0.0, server.pid)]
        started = time.monotonic()
        deadline = started + args.duration

        async def worker() -> None:
            while True:
                i = next(numbers)
                if time.monotonic() >= deadline and i >= args.min_requests:
                    return
                kind = MIX[i % len(MIX)]
                if kind == "good":
                    name, data = jpegs[i % len(jpegs)]
                    upload = (name, data, "image/jpeg")
                else:
                    upload = hostile[kind]
                sent = time.perf_counter()
                try:
                    response = await client.post("/v1/detect", files={"image": upload})
                    answer = str(response.status_code)
                except httpx.HTTPError as exc:
                    answer = type(exc).__name__
                if kind == "good" and answer == "200":
                    good_latency_s.append(time.perf_counter() - sent)
                answers[kind][answer] += 1

        async def sample_memory(progress: tqdm) -> None:
            while (now := time.monotonic()) < deadline:
                await asyncio.sleep(min(args.sample_every, max(0.0, deadline - now)))
                samples.append(rss_sample(time.monotonic() - started, server.pid))
                progress.update(round(time.monotonic() - started) - progress.n)

        with tqdm(total=round(args.duration), unit="s", desc="soak", disable=None) as progress:
            sampler = asyncio.ensure_future(sample_memory(progress))
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            await sampler
        seconds = time.monotonic() - started
        samples.append(rss_sample(seconds, server.pid))
        live = (await client.get("/health/live")).status_code
        metrics = (await client.get("/metrics")).text
    return {
        "seconds": seconds,
        "answers": {kind: dict(counts) for kind, counts in sorted(answers.items())},
        "good_latency_ms": latency_summary(good_latency_s),
        "rss_samples": samples,
        "peak_rss_bytes": read_peak_rss(server.pid),
        "live_after": live,
        "metrics_after": {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in metrics.splitlines()
            if line.startswith(("yolov1_rejections_total", "yolov1_batch_failures_total"))
        },
    }


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """Totals by status, the unexpected answers and the RSS figures of a ``soak`` run."""
    by_status: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    for kind, counts in run["answers"].items():
        for answer, n in counts.items():
            by_status[answer] += n
            if answer not in EXPECTED[kind] | SHED:
                unexpected[f"{kind}:{answer}"] += n
    rss = [s["rss_bytes"] for s in run["rss_samples"] if s["rss_bytes"] is not None]
    anon = [s["anon_bytes"] for s in run["rss_samples"] if s["anon_bytes"] is not None]
    sent = sum(by_status.values())
    good = sum(run["answers"].get("good", {}).values())
    return {
        "sent": sent,
        "requests_per_s": sent / run["seconds"],
        "good_ok_per_s": run["answers"].get("good", {}).get("200", 0) / run["seconds"],
        "good_sent": good,
        "by_status": dict(by_status.most_common()),
        "unexpected": dict(unexpected),
        "rss_start_bytes": rss[0] if rss else None,
        "rss_sampled_peak_bytes": max(rss) if rss else None,
        "rss_end_bytes": rss[-1] if rss else None,
        "anon_start_bytes": anon[0] if anon else None,
        "anon_peak_bytes": max(anon) if anon else None,
        "anon_end_bytes": anon[-1] if anon else None,
        # From the middle of the run to its end: growth there would be a leak, not warm-up.
        "rss_growth_second_half_bytes": (rss[-1] - rss[len(rss) // 2]) if len(rss) > 1 else None,
    }


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MB:.1f} MiB"


def format_report(results: dict[str, Any]) -> str:
    run, summary, meta = results["run"], results["summary"], results["meta"]
    lines = [
        f"soak: {meta['weights']} ({meta['arch']} {meta['image_size']} px) on {meta['device']}, "
        f"{meta['args']['concurrency']} clients, {run['seconds']:.0f} s, {meta['date']}",
        f"machine: {meta['machine']['cpu']} ({meta['machine']['cpu_count']} CPUs)",
        "",
        f"{'kind':<10} {'sent':>7}  answers",
    ]
    for kind, counts in run["answers"].items():
        text = ", ".join(f"{answer}: {n}" for answer, n in sorted(counts.items()))
        lines.append(f"{kind:<10} {sum(counts.values()):>7}  {text}")
    latency = run["good_latency_ms"]
    p50 = "n/a" if latency["p50"] is None else f"{latency['p50']:.1f} ms"
    p99 = "n/a" if latency["p99"] is None else f"{latency['p99']:.1f} ms"
    lines += [
        "",
        f"requests: {summary['sent']} ({summary['requests_per_s']:.1f}/s); by status: "
        + ", ".join(f"{k}: {v}" for k, v in summary["by_status"].items()),
        f"unexpected answers: {summary['unexpected'] or 'none'}",
        f"good requests: p50 {p50}, p99 {p99}, {summary['good_ok_per_s']:.1f} answered/s",
        f"server RSS: start {_mb(summary['rss_start_bytes'])}, sampled peak "
        f"{_mb(summary['rss_sampled_peak_bytes'])}, end {_mb(summary['rss_end_bytes'])} "
        f"(VmHWM {_mb(run['peak_rss_bytes'])}; growth over the second half "
        f"{_mb(summary['rss_growth_second_half_bytes'])})",
        f"  of which anonymous: start {_mb(summary['anon_start_bytes'])}, peak "
        f"{_mb(summary['anon_peak_bytes'])}, end {_mb(summary['anon_end_bytes'])}",
        f"after: /health/live {run['live_after']}; server exit status {results['exit_status']}",
    ]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    parser.add_argument(
        "--min-requests",
        type=int,
        default=0,
        help=f"send at least this many, past --duration if need be ({len(MIX)} = one full mix)",
    )
    add_checkpoint_arguments(parser, "serve")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--images", type=Path, default=IMAGES_DIR, help="folder of real JPEGs")
    parser.add_argument("--sample-every", type=float, default=5, help="seconds between RSS reads")
    parser.add_argument("--request-timeout-s", type=float, default=120)
    parser.add_argument("--startup-timeout-s", type=float, default=600)
    add_setting_argument(parser, "MAX_QUEUE=32")
    parser.add_argument("--out", type=Path, help="JSON (default: bench-results/soak-<date>.json)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    if args.duration <= 0 or args.concurrency < 1:
        sys.exit("benchmarks.soak: --duration must be > 0 and --concurrency >= 1")
    if not args.images.is_dir() or not any(args.images.glob("*.jpg")):
        sys.exit(
            f"benchmarks.soak: no JPEGs at {args.images}; the good requests upload real photos "
            "(../shared/images beside the repository), or pass --images DIR"
        )
    jpegs = load_jpegs(args.images)
    settings = dict(args.set)
    upload_limit = int(
        settings.get("MAX_UPLOAD_BYTES", Settings.model_fields["max_upload_bytes"].default)
    )
    hostile = hostile_uploads(jpegs[0][1], upload_limit)
    keys = [k.strip() for k in settings.get("API_KEYS", "").split(",") if k.strip()]
    headers = {"X-API-Key": keys[0]} if keys else {}

    with tempfile.TemporaryDirectory(prefix="yolov1-soak-") as tmp:
        workdir = Path(tmp)
        weights = checkpoint_from_args(args, workdir, "benchmarks.soak")
        metadata = read_metadata(weights)
        device = resolve_device(args.device)
        meta = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": describe_machine(device),
            "arch": metadata["arch"],
            "image_size": metadata["image_size"],
            "weights": str(weights) if args.arch is None else f"random {args.arch}",
            "weights_sha256": file_sha256(weights),
            "device": device,
            "mix": dict(Counter(MIX)),
            "images": [name for name, _ in jpegs],
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        port = free_port()
        env = {
            **os.environ,
            "YOLOV1_WEIGHTS": str(weights),
            "YOLOV1_DEVICE": args.device,
            "YOLOV1_HOST": "127.0.0.1",
            "YOLOV1_PORT": str(port),
            **{f"YOLOV1_{key}": value for key, value in settings.items()},
        }
        server = Server("soak", [sys.executable, "-m", "app.main"], env, port, workdir / "log")
        try:
            server.wait_ready(args.startup_timeout_s)
            logger.info("serving on %s (pid %d); soaking for %g s", server.base_url, server.pid,
                        args.duration)  # fmt: skip
            run = asyncio.run(soak(server, jpegs, hostile, args, headers))
        finally:
            server.stop()
        exit_status = server.process.returncode

    results = {"meta": meta, "run": run, "summary": summarise(run), "exit_status": exit_status}
    print(format_report(results))
    write_results(results, args.out, f"soak-{meta['arch']}-{meta['image_size']}")
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
