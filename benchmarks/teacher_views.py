"""Label once and move the boxes, or run the teacher on every augmented view?

    python -m benchmarks.teacher_views --teacher CFG WEIGHTS --images DIR [--views 200]

``yolov1-train --teacher`` labels each image once, on the plain resize, and moves the boxes with
each augmented view as annotated boxes move. The alternative runs the teacher on every view the
student sees. For ``--views`` augmented views (the training augmentation, seeded) of images drawn
from ``--images``, this prints the teacher's cost (seconds a pass; labelling once is one pass an
image, labelling every view V passes for V views an image) and how far the two labels differ:
the moved labels scored against the teacher's labels of the same view pixels (a box agrees when
the class is the same and IoU >= 0.5; both above ``--threshold``).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from torchvision.ops import box_iou

from model.config import VOC_CLASSES
from model.data import DetectionDataset
from model.teacher import (
    class_mapping,
    label_images,
    list_unlabeled,
    load_teachers,
    teacher_annotation,
)


def matches(a_boxes, a_labels, b_boxes, b_labels, iou: float = 0.5) -> int:
    """Greedy one-to-one matches of the same class with IoU >= ``iou``."""
    if len(a_boxes) == 0 or len(b_boxes) == 0:
        return 0
    overlap = box_iou(a_boxes, b_boxes)
    overlap[a_labels[:, None] != b_labels[None, :]] = 0
    found = 0
    while True:
        best = overlap.max()
        if best < iou:
            return found
        i, j = divmod(int(overlap.argmax()), overlap.shape[1])
        overlap[i, :] = 0
        overlap[:, j] = 0
        found += 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--teacher", nargs=2, type=Path, action="append", required=True, metavar=("CFG", "WEIGHTS"),
        help="a Darknet detector; given more than once, their vote (as yolov1-train's)",
    )  # fmt: skip
    p.add_argument("--images", nargs="+", type=Path, required=True)
    p.add_argument("--views", type=int, default=200)
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-cache", type=Path, help="teacher label cache (default: a temp dir)")
    a = p.parse_args(argv)

    teacher = load_teachers(a.teacher)
    mapping = class_mapping(teacher.class_names, list(VOC_CLASSES))
    paths = sorted(random.Random(a.seed).sample(list_unlabeled(a.images), a.views))
    with tempfile.TemporaryDirectory() as tmp:
        labels = label_images(teacher, paths, a.label_cache or Path(tmp), progress=False)
    annotations = [teacher_annotation(q, labels[q], mapping, a.threshold) for q in paths]
    size = teacher.input_size[0]
    dataset = DetectionDataset(annotations, size, train=True)  # the training augmentation
    torch.manual_seed(a.seed)
    moved_n = live_n = agree = 0
    teacher_seconds = 0.0
    for index in range(len(dataset)):
        image, target = dataset[index]
        start = time.perf_counter()
        (det,) = teacher.detect(image[None], a.threshold)
        teacher_seconds += time.perf_counter() - start
        live_boxes, live_labels = det["boxes"], torch.tensor([mapping[k] for k in det["labels"]])
        keep = live_labels >= 0
        live_boxes, live_labels = live_boxes[keep], live_labels[keep]
        moved_n += len(target["boxes"])
        live_n += len(live_boxes)
        agree += matches(target["boxes"], target["labels"], live_boxes, live_labels)
    print(f"views: {len(dataset)} (images from {', '.join(map(str, a.images))})")
    print(f"teacher: {teacher_seconds / len(dataset):.3f} s a pass (one image or view)")
    print(f"boxes: moved {moved_n}, teacher on the view {live_n}, agreeing {agree}")
    print(f"moved labels against the teacher on the view: precision {agree / max(moved_n, 1):.3f}, "
          f"recall {agree / max(live_n, 1):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
