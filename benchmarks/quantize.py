"""INT8 against float32 on the CPU: forward speed, the accuracy gate, and the agreement.

    python -m benchmarks.quantize --weights W [--record]      # a trained checkpoint
    python -m benchmarks.quantize --arch yolov1 --image-size 448   # random weights, BN calibrated

1. The float export (``model.export``) and the int8 engine (``model.quantize``, the service's
   settings unless ``--no-reduce-range`` / ``--method`` say otherwise), both cached.
2. Forward speed in ONNX Runtime with the service's session options and threads, at each batch
   size: the two engines take turns, ``--repeats`` times, and each keeps its best run (the
   machine is shared; the best run is the least disturbed) -> images/s and int8 / float32.
3. The accuracy gate, on the ``--eval-data`` split: mAP@0.5 of the PyTorch model
   (``yolov1-eval``'s numbers) and of the int8 engine, through the same data and matching; and
   the agreement: the int8 engine scored against float32's own detections over the checkpoint's
   calibrated threshold. Passed when the mAP moves by at most ``GATE_MAP_DELTA`` and the
   agreement is at least ``GATE_AGREEMENT``.
4. ``--record`` writes the verdict into the checkpoint's metadata (key ``int8``); with the gate
   passed and int8 at least ``TARGET_SPEEDUP_DEFAULT`` times as fast at batch 1 and at the best
   batch, ``YOLOV1_PRECISION=auto`` then serves int8 on the CPU.

Random weights (``--arch``) get their BatchNorm statistics from the calibration images, so
that activations have realistic ranges; their mAP means nothing, their agreement does.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from app.backends import _session_options, default_threads
from app.calibration import load_calibration_images
from app.settings import FALLBACK_CONF_THRESHOLD
from benchmarks.serving import REPO_ROOT, add_checkpoint_arguments, describe_machine, write_results
from model import VOC_CLASSES, build_model, load_checkpoint, save_checkpoint
from model.checkpoint import update_metadata
from model.data import read_datasets
from model.evaluate import agreement, onnx_forward, predict, score
from model.export import ensure_onnx
from model.metadata import file_sha256, read_metadata
from model.quantize import QuantizeSettings, calibration_files, ensure_int8, training_data

logger = logging.getLogger(__name__)

SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"
DEFAULT_EVAL_DATA = SHARED_DATASETS / "voc2007_subset"
# The gate: int8 mAP@0.5 within 0.01 (absolute) of float32, agreement >= 0.9.
GATE_MAP_DELTA = 0.01
GATE_AGREEMENT = 0.9
# The speed targets: int8 / float32 images/s, full yolov1 at 448 and the default weights.
TARGET_SPEEDUP_FULL = 1.8
TARGET_SPEEDUP_DEFAULT = 1.3


def random_calibrated_checkpoint(
    arch: str, image_size: int, images: list[np.ndarray], directory: Path
) -> Path:
    """A seeded random ``arch`` whose BatchNorm statistics are those of ``images``."""
    torch.manual_seed(0)
    model = build_model(arch, image_size=image_size)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over every batch
    model.train()
    with torch.no_grad():
        for batch in torch.from_numpy(np.stack(images)).split(8):  # (8, 3, H, W)
            model(batch)
    model.eval()
    path = directory / f"{arch}-{image_size}-random-bn.safetensors"
    return save_checkpoint(path, model, {"class_names": list(VOC_CLASSES)})


def time_engines(
    paths: dict[str, Path],
    images: list[np.ndarray],
    batch_sizes: list[int],
    threads: int,
    repeats: int,
    min_seconds: float,
) -> dict[str, Any]:
    """Best images/s of each engine at each batch size, the engines taking turns."""
    sessions = {
        name: ort.InferenceSession(str(path), _session_options(threads), ["CPUExecutionProvider"])
        for name, path in paths.items()
    }
    rows = []
    for batch_size in batch_sizes:
        picks = [images[i % len(images)] for i in range(batch_size)]
        x = np.stack(picks)  # (N, 3, H, W)
        calls = {}
        for name, session in sessions.items():  # warm up, and size each run to min_seconds
            session.run(["grid"], {"images": x})
            start = time.perf_counter()
            session.run(["grid"], {"images": x})
            calls[name] = max(2, math.ceil(min_seconds / (time.perf_counter() - start)))
        best = dict.fromkeys(sessions, 0.0)
        for _ in range(repeats):
            for name, session in sessions.items():
                start = time.perf_counter()
                for _ in range(calls[name]):
                    session.run(["grid"], {"images": x})
                rate = batch_size * calls[name] / (time.perf_counter() - start)
                best[name] = max(best[name], rate)
        row = {"batch_size": batch_size, **{f"{n}_img_s": r for n, r in best.items()}}
        row["speedup"] = best["int8"] / best["fp32"]
        rows.append(row)
        logger.info("batch %d: %s", batch_size, row)
    fp32_best = max(rows, key=lambda r: r["fp32_img_s"])
    int8_best = max(rows, key=lambda r: r["int8_img_s"])
    return {
        "rows": rows,
        "speedup_batch1": next((r["speedup"] for r in rows if r["batch_size"] == 1), None),
        "fp32_best_batch": fp32_best["batch_size"],
        "int8_best_batch": int8_best["batch_size"],
        "speedup_best": int8_best["int8_img_s"] / fp32_best["fp32_img_s"],
    }


def grid_agreement(paths: dict[str, Path], images: list[np.ndarray]) -> dict[str, float]:
    """How close the raw grids are: max |diff| / max |fp32| and their correlation."""
    x = np.stack(images)  # (N, 3, H, W)
    grids = {
        name: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
            ["grid"], {"images": x}
        )[0]
        for name, p in paths.items()
    }
    a, b = grids["fp32"], grids["int8"]
    return {
        "grid_max_error_over_max": float(np.abs(a - b).max() / np.abs(a).max()),
        "grid_correlation": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
    }


def accuracy_gate(
    weights: Path, int8_path: Path, eval_data: Path, split: str, conf_threshold: float
) -> dict[str, Any]:
    """float32 (PyTorch) and int8 mAP@0.5 on ``eval_data``, and int8's agreement with float32."""
    model, meta = load_checkpoint(weights)
    annotations = read_datasets([eval_data], "voc", split, meta["class_names"])
    if not annotations:
        raise ValueError(f"no annotated images in split {split!r} of {eval_data}")
    C = len(meta["class_names"])
    cpu = torch.device("cpu")
    fp32 = predict(model, annotations, cpu, progress=True)
    int8 = predict(model, annotations, cpu, progress=True, forward=onnx_forward(int8_path))
    scores = {"fp32": score(fp32, annotations, C), "int8": score(int8, annotations, C)}
    result: dict[str, Any] = {"images": len(annotations), "conf_threshold": conf_threshold}
    for name, s in scores.items():
        result |= {f"{name}_{k}": s[k] for k in ("map50_11point", "map50_all", "map_coco")}
    result |= agreement(fp32, int8, C, conf_threshold)
    result["map50_delta"] = max(
        abs(result["int8_map50_11point"] - result["fp32_map50_11point"]),
        abs(result["int8_map50_all"] - result["fp32_map50_all"]),
    )
    result["passed"] = bool(
        result["map50_delta"] <= GATE_MAP_DELTA
        and result["agreement_map50_11point"] >= GATE_AGREEMENT
        and result["agreement_map50_all"] >= GATE_AGREEMENT
    )
    return result


def format_report(results: dict[str, Any]) -> str:
    meta, speed = results["meta"], results["speed"]
    lines = [
        f"{meta['arch']} at {meta['image_size']} px, {meta['threads']} threads, "
        f"{meta['weights']}; int8 settings {meta['settings']}",
        "",
        "| forward, img/s | "
        + " | ".join(f"batch {r['batch_size']}" for r in speed["rows"])
        + " |",
        "|---|" + "---:|" * len(speed["rows"]),
    ]
    for name in ("fp32", "int8"):
        cells = " | ".join(f"{r[f'{name}_img_s']:.1f}" for r in speed["rows"])
        lines.append(f"| {name} | {cells} |")
    lines.append(
        "| int8 / fp32 | " + " | ".join(f"{r['speedup']:.2f}x" for r in speed["rows"]) + " |"
    )
    lines += [
        "",
        f"speedup at batch 1: {speed['speedup_batch1']:.2f}x; best int8 (batch "
        f"{speed['int8_best_batch']}) over best fp32 (batch {speed['fp32_best_batch']}): "
        f"{speed['speedup_best']:.2f}x",
        f"raw grid: max error {results['grid']['grid_max_error_over_max']:.2%} of the largest "
        f"value, correlation {results['grid']['grid_correlation']:.5f}",
    ]
    gate = results.get("gate")
    if gate:
        lines += [
            "",
            f"accuracy on {gate['images']} images | mAP@0.5 11-pt | mAP@0.5 all | COCO mAP",
            f"fp32 (PyTorch) | {gate['fp32_map50_11point']:.4f} | {gate['fp32_map50_all']:.4f} "
            f"| {gate['fp32_map_coco']:.4f}",
            f"int8 (ONNX Runtime) | {gate['int8_map50_11point']:.4f} | "
            f"{gate['int8_map50_all']:.4f} | {gate['int8_map_coco']:.4f}",
            f"agreement with fp32's detections >= {gate['conf_threshold']:.4f} "
            f"({gate['reference_objects']} boxes): mAP@0.5 {gate['agreement_map50_11point']:.4f} "
            f"(11-pt), {gate['agreement_map50_all']:.4f} (all)",
            f"{'PASS' if gate['passed'] else 'FAIL'} gate: |mAP delta| {gate['map50_delta']:.4f} "
            f"(<= {GATE_MAP_DELTA}), agreement >= {GATE_AGREEMENT}",
        ]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quantize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_checkpoint_arguments(parser, "measure")
    parser.add_argument(
        "--calibration-data",
        nargs="+",
        type=Path,
        help="calibration folders (default: the checkpoint's training data, else "
        f"{DEFAULT_EVAL_DATA})",
    )
    parser.add_argument("--calibration-images", type=int, default=QuantizeSettings().images)
    parser.add_argument("--method", choices=("minmax", "percentile", "entropy"), default="minmax")
    parser.add_argument("--no-reduce-range", dest="reduce_range", action="store_false")
    parser.add_argument("--no-equalize", dest="equalize", action="store_false")
    parser.add_argument("--eval-data", type=Path, default=DEFAULT_EVAL_DATA)
    parser.add_argument("--split", default="val")
    parser.add_argument("--no-gate", dest="gate", action="store_false", help="speed only")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--threads", type=int, help="default: the service's (default_threads)")
    parser.add_argument("--repeats", type=int, default=3, help="turns each engine takes")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="per timed run")
    parser.add_argument(
        "--record",
        action="store_true",
        help="write the verdict into the checkpoint (--weights; the service's settings only)",
    )
    parser.add_argument("--out", type=Path, help="raw JSON (default: bench-results/int8-...)")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = QuantizeSettings(
        args.calibration_images, "train", args.method, args.reduce_range, args.equalize
    )
    if args.record and (args.weights is None or settings != QuantizeSettings()):
        sys.exit("benchmarks.quantize: --record needs --weights and the service's int8 settings")
    if args.record and args.calibration_data:  # the service calibrates on the training data
        trained_on = [p.name for p in training_data(read_metadata(args.weights))]
        if [p.name for p in args.calibration_data] != trained_on:
            sys.exit(
                "benchmarks.quantize: --record measures the engine the service builds, calibrated "
                f"on the training data {trained_on}: leave out --calibration-data"
            )
    threads = args.threads or default_threads()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="yolov1-int8-bench-") as tmp:
        workdir = Path(tmp)
        if args.weights is not None:
            weights, cache = args.weights, None  # cached beside the weights, as the service does
            data = args.calibration_data or training_data(read_metadata(weights))
        else:
            weights, cache = None, workdir
            data = args.calibration_data or [DEFAULT_EVAL_DATA]
        size = args.image_size if weights is None else read_metadata(weights)["image_size"]
        images = load_calibration_images(calibration_files(data, "train", 32), size)
        if weights is None:
            weights = random_calibrated_checkpoint(args.arch, size, images, workdir)
        meta = read_metadata(weights)
        paths = {
            "fp32": ensure_onnx(weights, cache),
            "int8": ensure_int8(weights, data, settings, cache),
        }
        # Timed and compared on images the calibration did not see: the evaluation split's.
        held_out = images
        if args.eval_data.is_dir():
            held_out = load_calibration_images(
                calibration_files([args.eval_data], args.split, 16), size
            )
        results: dict[str, Any] = {
            "meta": {
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "machine": describe_machine("cpu"),
                "onnxruntime": ort.__version__,
                "arch": meta["arch"],
                "image_size": meta["image_size"],
                "weights": str(args.weights) if args.arch is None else f"random {args.arch}",
                "weights_sha256": file_sha256(weights),
                "threads": threads,
                "settings": asdict(settings),
                "calibration_data": [str(d) for d in data],
                "int8_bytes": paths["int8"].stat().st_size,
                "fp32_bytes": paths["fp32"].stat().st_size,
            },
            "grid": grid_agreement(paths, held_out[:8]),
        }
        results["speed"] = time_engines(
            paths, held_out, batch_sizes, threads, args.repeats, args.min_seconds
        )
        if args.gate:
            if args.eval_data.is_dir():
                threshold = meta.get("conf_threshold", FALLBACK_CONF_THRESHOLD)
                results["gate"] = accuracy_gate(
                    weights, paths["int8"], args.eval_data, args.split, threshold
                )
            else:
                logger.warning("no %s: the accuracy gate is not measured", args.eval_data)
    print(format_report(results))
    if args.record:
        record(args.weights, results, settings)
    write_results(results, args.out, f"int8-{meta['arch']}-{meta['image_size']}")
    return results


def record(weights: Path, results: dict[str, Any], settings: QuantizeSettings) -> None:
    """Store the verdict in the checkpoint, then write the int8 engine of the rewritten file."""
    gate, speed = results.get("gate"), results["speed"]
    if gate is None:
        sys.exit("benchmarks.quantize: --record needs the accuracy gate (the --eval-data split)")
    # The bar for the default weights, at batch 1 and at each engine's best batch.
    fast = min(speed["speedup_batch1"] or 0, speed["speedup_best"]) >= TARGET_SPEEDUP_DEFAULT
    default = gate["passed"] and fast
    entry = {
        "default": default,
        "settings": asdict(settings),
        "gate": {k: gate[k] for k in sorted(gate)},
        "speedup_batch1": speed["speedup_batch1"],
        "speedup_best": speed["speedup_best"],
        "measured": results["meta"]["date"],
        "command": "python -m benchmarks.quantize " + " ".join(sys.argv[1:]),
    }
    update_metadata(weights, int8=entry)
    print(f"recorded int8 default={default} in {weights} (its SHA-256 changed)")
    data = results["meta"]["calibration_data"]
    print(f"int8 engine of the new file: {ensure_int8(weights, data, settings)}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
