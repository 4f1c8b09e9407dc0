"""Score a checkpoint on annotated images: `yolov1-eval --weights W --data ROOT --split val`.

Ground truth comes from the annotation files (pixel boxes with their difficult flags), never
from the grid; predictions are mapped back to each image's pixels before matching.
``--precision int8`` scores the service's int8 engine (``model.quantize``) in ONNX Runtime on
the same images, through the same decoding and matching, so the two numbers compare.
``--mirror`` scores the horizontally mirrored images (the detections mapped back onto the
originals): a second sample of the same distribution, for telling a small val set's noise from a
real difference.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.boxes import unmirror_boxes
from model.checkpoint import CheckpointError, load_checkpoint, update_metadata
from model.data import Annotation, DetectionDataset, detection_collate, read_datasets
from model.metrics import best_f1_threshold, coco_map, evaluate_detections
from model.network import YOLOv1
from model.postprocess import postprocess
from model.quantize import PRECISIONS, QuantizeSettings, ensure_int8, training_data

logger = logging.getLogger(__name__)

# A low threshold, as in the VOC protocol: AP integrates over the whole precision-recall curve.
EVAL_CONF_THRESHOLD = 0.005


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


@torch.inference_mode()
def predict(
    model: YOLOv1,
    annotations: list[Annotation],
    device: torch.device,
    batch_size: int = 16,
    workers: int = 0,
    conf_threshold: float = EVAL_CONF_THRESHOLD,
    progress: bool = False,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mirror: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Run ``model`` on every image; return detections with boxes in each image's pixels (xyxy).

    ``forward``, when given, computes the raw grid (N, S, S, C+5B) from the (N, 3, H, W) images
    in place of ``model`` (which still gives S, B, C and the input size): another engine.
    ``mirror``: run on the horizontally mirrored images, boxes mapped back onto the originals.
    """
    was_training = model.training
    model.eval()
    dataset = DetectionDataset(annotations, model.image_size, train=False)
    loader = DataLoader(dataset, batch_size, num_workers=workers, collate_fn=detection_collate)
    results: list[dict[str, torch.Tensor]] = []
    for images, targets in tqdm(loader, desc="eval", disable=not progress, leave=False):
        images = images.flip(-1) if mirror else images
        raw = model(images.to(device)) if forward is None else forward(images)
        dets = postprocess(
            raw, model.boxes_per_cell, model.num_classes, conf_threshold, 0.5, max_detections=100
        )
        for det, target in zip(dets, targets, strict=True):
            h, w = target["orig_size"]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            results.append({k: v.cpu() for k, v in det.items()})
            results[-1]["boxes"] = results[-1]["boxes"] * scale
            if mirror:
                results[-1]["boxes"] = unmirror_boxes(results[-1]["boxes"], h, w)
    model.train(was_training)
    return results


def onnx_forward(path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``grid`` output of the ONNX Runtime engine at ``path``, on the CPU, as a function."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def forward(images: torch.Tensor) -> torch.Tensor:
        (grid,) = session.run(["grid"], {"images": images.cpu().float().numpy()})
        return torch.from_numpy(grid)  # (N, S, S, C+5B)

    return forward


def int8_forward(
    weights: Path, data: list[Path], settings: QuantizeSettings
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The service's int8 engine of ``weights`` (cached, else calibrated on ``data``)."""
    return onnx_forward(ensure_int8(weights, data, settings))


def score(
    predictions: list[dict[str, torch.Tensor]],
    annotations: list[Annotation],
    num_classes: int,
) -> dict[str, Any]:
    """VOC2007 11-point and VOC2010+ all-point mAP@0.5, and COCO-style mAP@[.5:.95]."""
    truths = [{"boxes": a.boxes, "labels": a.labels, "difficult": a.difficult} for a in annotations]
    voc07 = evaluate_detections(predictions, truths, num_classes, 0.5, "11point")
    voc12 = evaluate_detections(predictions, truths, num_classes, 0.5, "all")
    coco = coco_map(predictions, truths, num_classes)
    return {
        "map50_11point": voc07["map"],
        "map50_all": voc12["map"],
        "map_coco": coco["map"],
        "ap50_11point": voc07["ap"],
        "ap50_all": voc12["ap"],
        "conf_threshold_f1": best_f1_threshold(predictions, truths, num_classes),
    }


def agreement(
    reference: list[dict[str, torch.Tensor]],
    predictions: list[dict[str, torch.Tensor]],
    num_classes: int,
    conf_threshold: float,
) -> dict[str, float]:
    """How well ``predictions`` reproduce ``reference``'s own detections (same images, in order).

    ``reference``'s detections with a score ``>= conf_threshold`` (what the service would
    answer) are the ground truth; ``predictions`` are scored against them: VOC mAP@0.5,
    11-point and all-point. 1.0 is the same answer. Raises ``ValueError`` when no reference
    detection reaches the threshold (there would be nothing to agree on).
    """
    truths = []
    for ref in reference:
        keep = ref["scores"] >= conf_threshold
        truths.append({"boxes": ref["boxes"][keep], "labels": ref["labels"][keep]})
    if not any(len(t["labels"]) for t in truths):
        raise ValueError(f"no reference detection has a score >= {conf_threshold}")
    return {
        "agreement_map50_11point": evaluate_detections(
            predictions, truths, num_classes, 0.5, "11point"
        )["map"],
        "agreement_map50_all": evaluate_detections(predictions, truths, num_classes, 0.5, "all")[
            "map"
        ],
        "reference_objects": sum(len(t["labels"]) for t in truths),
    }


def format_table(result: dict[str, Any], class_names: list[str]) -> str:
    """A per-class AP table followed by the summary numbers."""
    lines = [f"{'class':<14} {'AP50 (11pt)':>11} {'AP50 (all)':>11}"]
    for name, ap07, ap12 in zip(
        class_names, result["ap50_11point"], result["ap50_all"], strict=True
    ):
        lines.append(f"{name:<14} {ap07:>11.3f} {ap12:>11.3f}")
    lines.append(f"{'mAP@0.5':<14} {result['map50_11point']:>11.3f} {result['map50_all']:>11.3f}")
    lines.append(f"mAP@[.5:.95] (COCO-style, 101-point): {result['map_coco']:.3f}")
    lines.append(f"best-F1 score threshold: {result['conf_threshold_f1']:.3f}")
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("yolov1-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="a .safetensors checkpoint")
    parser.add_argument(
        "--teacher", nargs=2, type=Path, action="append", metavar=("CFG", "WEIGHTS"),
        help="score a Darknet [yolo] detector (VOC classes) instead of --weights; given more "
        "than once, the detectors' vote (the ensemble teacher of yolov1-train)",
    )  # fmt: skip
    parser.add_argument("--data", required=True, nargs="+", type=Path, help="dataset root(s)")
    parser.add_argument("--format", choices=("voc", "yolo"), default="voc")
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:i")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32: the PyTorch model; int8: the service's int8 ONNX Runtime engine (CPU)",
    )
    parser.add_argument(
        "--calibration-data",
        nargs="+",
        type=Path,
        help="int8: calibration folders if no engine is cached (default: the training data)",
    )
    parser.add_argument("--calibration-images", type=int, default=QuantizeSettings().images)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="store the best-F1 score threshold in the checkpoint (the service's default)",
    )
    parser.add_argument(
        "--mirror",
        action="store_true",
        help="score the horizontally mirrored images (detections mapped back): a second "
        "sample of the same distribution, to tell a small split's noise from a difference",
    )
    return parser


def main_teacher(args: argparse.Namespace) -> dict[str, Any]:
    """Score a Darknet detector on the same data, with the same matching, as a checkpoint."""
    from model.teacher import load_teachers, predict_teacher

    teacher = load_teachers(args.teacher)
    annotations = read_datasets(args.data, args.format, args.split, teacher.class_names)
    start = time.perf_counter()
    predictions = predict_teacher(teacher, annotations, mirror=args.mirror)
    elapsed = time.perf_counter() - start
    result = score(predictions, annotations, len(teacher.class_names))
    result.update(images=len(annotations), images_per_s=len(annotations) / elapsed,
                  teacher=teacher.describe(), split=args.split, mirror=args.mirror)  # fmt: skip
    print(format_table(result, teacher.class_names))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.teacher:
        return main_teacher(args)
    if args.weights is None:
        raise ValueError("give --weights (or --teacher CFG WEIGHTS)")
    if args.calibrate and args.mirror:  # the service sees the images as they are
        raise ValueError("--calibrate stores the threshold of the images as given: run it "
                         "without --mirror")  # fmt: skip
    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.weights, device)
    class_names = meta["class_names"]
    annotations = read_datasets(args.data, args.format, args.split, class_names)
    if not annotations:
        raise ValueError(f"no annotated images in split {args.split!r} of {args.data}")
    forward = None
    if args.precision == "int8":
        if args.calibrate:  # the service's threshold is the float model's (it is the fallback)
            raise ValueError("--calibrate stores the fp32 threshold: run it without --precision")
        if device.type != "cpu":
            raise ValueError(f"the int8 engine runs on the CPU, got --device {args.device}")
        data = args.calibration_data or training_data(meta)
        forward = int8_forward(args.weights, data, QuantizeSettings(args.calibration_images))
    start = time.perf_counter()
    predictions = predict(model, annotations, device, args.batch_size, args.workers,
                          progress=True, forward=forward, mirror=args.mirror)  # fmt: skip
    elapsed = time.perf_counter() - start
    result = score(predictions, annotations, len(class_names))
    result.update(
        images=len(annotations),
        images_per_s=len(annotations) / elapsed,
        weights=str(args.weights),
        precision=args.precision,
        split=args.split,
        mirror=args.mirror,
        class_names=class_names,
    )
    print(format_table(result, class_names))
    print(f"{len(annotations)} images in {elapsed:.1f} s ({result['images_per_s']:.1f} images/s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.calibrate:
        threshold = result["conf_threshold_f1"]
        if threshold != threshold:  # NaN: nothing detected
            raise ValueError("no detection on this split: cannot calibrate a threshold")
        update_metadata(args.weights, conf_threshold=round(threshold, 4))
        print(f"stored conf_threshold={threshold:.4f} in {args.weights}")
    return result


def cli(argv: list[str] | None = None) -> None:
    """Console entry point: errors are one line on stderr, never a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (CheckpointError, ValueError, FileNotFoundError, OSError) as exc:
        print(f"yolov1-eval: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
