"""The benchmark script end to end in a tiny configuration, and its pure helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.serving import evaluate, format_report, latency_summary, parse_batch_size

REPO_ROOT = Path(__file__).resolve().parents[1]

METRICS_TEXT = """\
# HELP yolov1_batch_size Images per batch run.
# TYPE yolov1_batch_size histogram
yolov1_batch_size_bucket{le="1.0"} 3.0
yolov1_batch_size_bucket{le="+Inf"} 5.0
yolov1_batch_size_count 5.0
yolov1_batch_size_sum 12.0
yolov1_batch_size_created 1.7e+09
"""


def test_parse_batch_size_reads_sum_and_count() -> None:
    assert parse_batch_size(METRICS_TEXT) == (12.0, 5.0)


def test_parse_batch_size_without_the_histogram_raises() -> None:
    with pytest.raises(ValueError, match="yolov1_batch_size"):
        parse_batch_size("yolov1_queue_depth 0.0\n")


def test_latency_summary_in_milliseconds() -> None:
    summary = latency_summary([i / 1000 for i in range(1, 101)])  # 1 ... 100 ms
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p99"] == pytest.approx(99.01)
    assert latency_summary([]) == {"p50": None, "p95": None, "p99": None, "mean": None}


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small JPEGs of different shapes, so the run needs no shared data."""
    directory = tmp_path_factory.mktemp("images")
    for i, size in enumerate([(320, 240), (200, 300), (256, 256)]):
        Image.effect_noise(size, 40 + 20 * i).convert("RGB").save(directory / f"{i}.jpg")
    return directory


@pytest.mark.slow
def test_tiny_run_writes_every_field(jpeg_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "benchmarks.serving", "--arch", "yolov1-tiny", "--image-size", "128",
        "--images", str(jpeg_dir), "--batch-sizes", "1,2", "--inproc-images", "2",
        "--concurrency", "1,4", "--requests", "4", "--large-requests", "2",
        "--large-size", "800x600", "--decode-repeats", "1", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())

    assert results["meta"]["arch"] == "yolov1-tiny"
    assert results["meta"]["weights_fp32_bytes"] > 0
    rows = {(r["backend"], r["mode"], r["batch_size"]) for r in results["in_process"]}
    assert rows == {
        (backend, mode, batch)
        for backend in ("torch", "onnxruntime")
        for mode in ("forward", "end_to_end")
        for batch in (1, 2)
    }
    assert all(r["images_per_s"] > 0 for r in results["in_process"])
    assert results["decode"]["full_ms"] > 0 and results["decode"]["draft_ms"] > 0

    for name in ("service", "naive"):
        server = results["servers"][name]
        assert [r["load"] for r in server["rows"]] == ["c1", "c4", "large c4"]
        for row in server["rows"]:
            assert row["ok"] == row["requests"] and not row["timed_out"], row
            assert row["latency_ms"]["p50"] <= row["latency_ms"]["p95"] <= row["latency_ms"]["p99"]
            assert row["images_per_s"] > 0
        assert server["peak_rss_bytes"] > 0
    service_rows = results["servers"]["service"]["rows"]
    assert all(1 <= r["mean_batch_size"] <= 4 for r in service_rows)  # c4 at most 4 per batch
    assert service_rows[0]["mean_batch_size"] == 1  # one request at a time

    targets = {t["target"]: t["passed"] for t in results["targets"]}
    assert len(targets) == 5
    # No c16 level was run, so the c16 targets are not judged; the others are.
    assert sum(passed is None for passed in targets.values()) == 3
    assert results["ratios"]["service_c1_p50_over_inprocess_single_e2e"] > 0
    assert "PASS" in done.stdout or "FAIL" in done.stdout
    assert format_report(results) in done.stdout
    assert evaluate(results) == (results["ratios"], results["targets"])


def test_missing_image_folder_is_one_clear_line(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "benchmarks.serving", "--arch", "yolov1-tiny",
        "--images", str(tmp_path / "absent"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no image folder" in done.stderr and "--images" in done.stderr
    assert "Traceback" not in done.stderr
