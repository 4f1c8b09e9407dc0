"""A pretrained detector as teacher: labels for unlabelled images, cached, class-mapped by name.

The teacher is a Darknet ``[yolo]`` detector (``model.darknet``) or one of our checkpoints. Each
image is labelled once, on the plainly resized full image, and the labels are cached keyed by
the teacher's and the image's SHA-256; training then treats them as ground truth, so every crop,
flip and scale moves them exactly as it moves annotated boxes. A Darknet teacher's labels also
keep each box's class distribution and objectness, the soft targets of ``--soft-targets``.
Several Darknet teachers (``--teacher`` repeated) vote as one ``EnsembleTeacher``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from model.boxes import unmirror_boxes
from model.config import VOC_CLASSES
from model.data import Annotation, load_image_rgb, read_image_size, read_voc, voc_class_names
from model.files import image_files, voc_split_file
from model.metadata import file_sha256

logger = logging.getLogger(__name__)

# Detections kept in the cache: low, so that --teacher-threshold can change without relabelling.
CACHE_FLOOR = 0.05


class Teacher:
    """A frozen detector: ``detect(images)`` on (N, 3, size, size) RGB in [0, 1]."""

    gives_class_probs = True  # its detections carry "class_probs" (K, C)

    def __init__(self, cfg: Path, weights: Path, class_names: Sequence[str] | None = None):
        self.cfg, self.weights = Path(cfg), Path(weights)
        if self.cfg.suffix == ".safetensors":
            raise ValueError("give a checkpoint teacher as --teacher CKPT.safetensors alone")
        from model.darknet import Yolo, load_darknet

        self.network = load_darknet(self.cfg, self.weights)
        yolos = [self.network.layers[i] for i in self.network.output_layers]
        if not all(isinstance(y, Yolo) for y in yolos):
            raise ValueError(f"{self.cfg}: a teacher must be a [yolo] detector")
        classes = yolos[0].classes
        names = list(class_names) if class_names else list(VOC_CLASSES)
        if len(names) != classes:
            raise ValueError(f"{self.cfg} has {classes} classes, {len(names)} names were given")
        self.class_names = names
        self.input_size = (self.network.height, self.network.width)
        digest = hashlib.sha256()
        for path in (self.cfg, self.weights):
            digest.update(bytes.fromhex(file_sha256(path)))
        self.sha256 = digest.hexdigest()
        self.kind = "darknet"

    @torch.inference_mode()
    def detect(self, images: torch.Tensor, threshold: float) -> list[dict[str, torch.Tensor]]:
        from model.darknet import detect_yolo

        return detect_yolo(self.network, images, threshold, 0.45, max_detections=100)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "cfg": self.cfg.name,
            "weights": self.weights.name,
            "sha256": self.sha256,
            "input_size": list(self.input_size),
        }


class CheckpointTeacher(Teacher):
    """One of our checkpoints as teacher."""

    gives_class_probs = False

    def __init__(self, path: Path):
        from model.checkpoint import load_checkpoint

        self.cfg = self.weights = Path(path)
        self.model, meta = load_checkpoint(path)
        self.class_names = list(meta["class_names"])
        self.input_size = (self.model.image_size, self.model.image_size)
        self.sha256 = file_sha256(path)
        self.kind = "checkpoint"

    @torch.inference_mode()
    def detect(self, images: torch.Tensor, threshold: float) -> list[dict[str, torch.Tensor]]:
        from model.postprocess import postprocess

        m = self.model
        return postprocess(m(images), m.boxes_per_cell, m.num_classes, threshold, 0.45)


class EnsembleTeacher(Teacher):
    """Several Darknet teachers voting on each object (``--teacher`` given more than once).

    Every member runs on the same image; their detections are fused by ``fuse_detections``: a
    box the members agree on gets their mean class distribution (so two members calling an
    animal a horse outvote one calling it a cow) and an objectness that counts the members
    that saw it. Labels are cached per member, so adding a member labels only with it.
    """

    def __init__(self, members: Sequence[Teacher], iou_threshold: float = 0.5):
        if len(members) < 2:
            raise ValueError(f"an ensemble needs two teachers or more, got {len(members)}")
        if not all(m.gives_class_probs for m in members):
            raise ValueError("an ensemble takes Darknet teachers (CFG WEIGHTS) only: "
                             "a checkpoint teacher gives no class distribution")  # fmt: skip
        names = {tuple(m.class_names) for m in members}
        if len(names) != 1:
            raise ValueError(f"the ensemble's teachers name their classes differently: {names}")
        self.members = list(members)
        self.iou_threshold = iou_threshold
        self.class_names = list(members[0].class_names)
        # Images come at the largest member's size; the others see them scaled down.
        self.input_size = max(m.input_size for m in members)
        digest = hashlib.sha256(f"ensemble iou={iou_threshold}".encode())
        for member in members:
            digest.update(bytes.fromhex(member.sha256))
        self.sha256 = digest.hexdigest()
        self.kind = "ensemble"

    @torch.inference_mode()
    def detect(self, images: torch.Tensor, threshold: float) -> list[dict[str, torch.Tensor]]:
        per_member = []
        for member in self.members:
            view = images
            if tuple(images.shape[-2:]) != member.input_size:
                view = F.resize(images, list(member.input_size), antialias=True)
            # Members report down to a floor well under the threshold: a box one member sees
            # weakly still adds its vote when another sees it strongly.
            per_member.append(member.detect(view, min(threshold, CACHE_FLOOR)))
        return [
            fuse_detections([with_objectness(d[n]) for d in per_member], threshold,
                            self.iou_threshold)
            for n in range(images.shape[0])
        ]  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sha256": self.sha256,
            "fusion_iou": self.iou_threshold,
            "members": [m.describe() for m in self.members],
            "input_size": list(self.input_size),
        }


def with_objectness(detections: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``objectness`` (K,) to a Darknet detector's detections: score / chosen class prob."""
    chosen = detections["class_probs"].gather(1, detections["labels"][:, None])[:, 0]
    return detections | {"objectness": detections["scores"] / chosen.clamp(min=1e-6)}


def fuse_detections(
    detections: Sequence[dict[str, torch.Tensor]],
    threshold: float,
    iou_threshold: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Fuse M detectors' detections of one image into one set (a vote per object).

    Each input holds ``boxes`` (K, 4) xyxy (any one scale), ``scores`` (K,), ``labels`` (K,),
    ``class_probs`` (K, C) and ``objectness`` (K,). Greedily, highest score first, a box and
    every not yet used box overlapping it by IoU >= ``iou_threshold`` (whatever their classes)
    form an object; from each member the object takes that member's best-scored box. The object
    is the score-weighted mean of those boxes, its class distribution their mean, and its
    objectness their sum / M (a member that missed it votes 0). Like a detector's output, an
    object gives one detection per class whose objectness x probability is above ``threshold``.
    Returns ``boxes``, ``scores`` (decreasing), ``labels``, ``class_probs`` and ``objectness``.
    """
    from torchvision.ops import box_iou

    M = len(detections)
    boxes = torch.cat([d["boxes"] for d in detections])  # (K, 4)
    scores = torch.cat([d["scores"] for d in detections])
    objectness = torch.cat([d["objectness"] for d in detections])
    probs = torch.cat([d["class_probs"] for d in detections])  # (K, C)
    member = torch.cat([torch.full((len(d["boxes"]),), m) for m, d in enumerate(detections)])
    overlap = box_iou(boxes, boxes) >= iou_threshold  # (K, K)
    used = torch.zeros(len(boxes), dtype=torch.bool)
    fused_boxes, fused_obj, fused_probs = [], [], []
    for i in scores.argsort(descending=True).tolist():
        if used[i]:
            continue
        group = (overlap[i] & ~used).nonzero()[:, 0]
        used[group] = True
        best = [group[member[group] == m] for m in range(M)]
        best = torch.stack([g[scores[g].argmax()] for g in best if len(g)])
        weights = scores[best]
        fused_boxes.append((boxes[best] * weights[:, None]).sum(0) / weights.sum())
        fused_obj.append(objectness[best].sum() / M)
        fused_probs.append(probs[best].mean(0))
    C = probs.shape[1]
    if not fused_boxes:
        return {
            "boxes": boxes.new_zeros((0, 4)),
            "scores": scores.new_zeros((0,)),
            "labels": torch.zeros(0, dtype=torch.int64),
            "class_probs": probs.new_zeros((0, C)),
            "objectness": scores.new_zeros((0,)),
        }
    obj, cls = torch.stack(fused_obj), torch.stack(fused_probs)  # (G,), (G, C)
    index, labels = (obj[:, None] * cls > threshold).nonzero(as_tuple=True)
    out_scores = obj[index] * cls[index, labels]
    order = out_scores.argsort(descending=True)
    index, labels = index[order], labels[order]
    return {
        "boxes": torch.stack(fused_boxes)[index],
        "scores": out_scores[order],
        "labels": labels,
        "class_probs": cls[index],
        "objectness": obj[index],
    }


def load_teacher(spec: Sequence[str | Path], class_names: Sequence[str] | None = None) -> Teacher:
    """``[CFG, WEIGHTS]`` (Darknet) or ``[CHECKPOINT]`` -> a teacher in inference mode."""
    if len(spec) == 1:
        return CheckpointTeacher(Path(spec[0]))
    if len(spec) == 2:
        return Teacher(Path(spec[0]), Path(spec[1]), class_names)
    raise ValueError(f"--teacher takes CFG WEIGHTS or one checkpoint, got {list(spec)}")


def load_teachers(
    specs: Sequence[Sequence[str | Path]], class_names: Sequence[str] | None = None
) -> Teacher:
    """One ``--teacher`` spec -> that teacher; several -> an ``EnsembleTeacher`` of them."""
    teachers = [load_teacher(spec, class_names) for spec in specs]
    return teachers[0] if len(teachers) == 1 else EnsembleTeacher(teachers)


def class_mapping(teacher_names: Sequence[str], student_names: Sequence[str]) -> list[int]:
    """Student index of each teacher class; every student class must be a teacher class."""
    missing = [n for n in student_names if n not in teacher_names]
    if missing:
        raise ValueError(
            f"the teacher's classes are not a superset of the student's: it lacks {missing}"
        )
    index = {n: i for i, n in enumerate(student_names)}
    return [index.get(n, -1) for n in teacher_names]


def list_unlabeled(folders: Sequence[str | Path], split: str = "train") -> list[Path]:
    """Every image under each folder (recursively), sorted; a VOC root gives its ``split``.

    A VOC root (with ``ImageSets/Main/<split>.txt``) contributes only the images of that split,
    so that its val images are never trained on. Files that do not open as images are skipped
    with one warning each.
    """
    paths: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ValueError(f"--unlabeled: {folder} is not a folder")
        found = image_files(folder, split)
        kept = 0
        for path in found:
            try:
                read_image_size(path)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                logger.warning("%s: image skipped: not a readable image (%s)", path, exc)
                continue
            paths.append(path)
            kept += 1
        logger.info("unlabelled %s: %d images", folder, kept)
    return paths


def _load_for_teacher(path: Path, size: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    image = load_image_rgb(path)
    width, height = image.size
    resized = image.resize((size[1], size[0]), Image.BILINEAR)
    return F.to_dtype(F.pil_to_tensor(resized), torch.float32, scale=True), width, height


class LabelCache:
    """``<dir>/teacher-<sha16>.json``: image SHA-256 -> the teacher's detections (normalised)."""

    def __init__(self, directory: Path, teacher: Teacher):
        self.path = Path(directory) / f"teacher-{teacher.sha256[:16]}.json"
        self.entries: dict[str, Any] = {}
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                logger.warning("%s: unreadable label cache, relabelling (%s)", self.path, exc)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries))
        tmp.replace(self.path)


def label_images(
    teacher: Teacher,
    paths: Sequence[Path],
    cache_dir: Path,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[Path, dict[str, Any]]:
    """The teacher's detections of every image (cached): ``{path: {"boxes": [[x1, y1, x2, y2]]
    normalised, "scores": [...], "labels": [teacher class index], "size": [w, h]}}``; a Darknet
    teacher's also hold ``"class_probs"`` (a list of the teacher's C class probabilities per box)
    and ``"objectness"`` (per box; ``score = objectness * class_probs[label]``)."""
    keys = {path: file_sha256(path) for path in paths}  # read each image once
    if isinstance(teacher, EnsembleTeacher):  # each member's labels are cached on their own
        per_member = [_cached_labels(m, paths, keys, cache_dir, batch_size, progress)
                      for m in teacher.members]  # fmt: skip
        C = len(teacher.class_names)
        return {p: _fuse_entries([labels[p] for labels in per_member], teacher.iou_threshold, C)
                for p in paths}  # fmt: skip
    return _cached_labels(teacher, paths, keys, cache_dir, batch_size, progress)


def _cached_labels(
    teacher: Teacher,
    paths: Sequence[Path],
    keys: dict[Path, str],
    cache_dir: Path,
    batch_size: int,
    progress: bool,
) -> dict[Path, dict[str, Any]]:
    """``label_images`` for one detector, the images' SHA-256 ``keys`` given."""
    cache = LabelCache(cache_dir, teacher)
    todo = [
        p for p in paths
        if keys[p] not in cache.entries
        or (teacher.gives_class_probs and "class_probs" not in cache.entries[keys[p]])
    ]  # fmt: skip
    if todo:
        logger.info("teacher: labelling %d images (%d cached)", len(todo), len(paths) - len(todo))
    bar = tqdm(total=len(todo), desc="teacher labels", disable=not progress, leave=False)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        loaded = [_load_for_teacher(p, teacher.input_size) for p in chunk]
        images = torch.stack([image for image, _, _ in loaded])  # (n, 3, h, w)
        detections = teacher.detect(images, CACHE_FLOOR)
        for path, det, (_, w, h) in zip(chunk, detections, loaded, strict=True):
            if "class_probs" in det:
                det = with_objectness(det)
            cache.entries[keys[path]] = _cache_entry(det, w, h)
        bar.update(len(chunk))
        if (start // batch_size) % 20 == 19:
            cache.save()
    bar.close()
    if todo:
        cache.save()
    return {p: cache.entries[keys[p]] for p in paths}


def _cache_entry(det: dict[str, torch.Tensor], width: int, height: int) -> dict[str, Any]:
    entry = {
        "boxes": [[round(v, 5) for v in box] for box in det["boxes"].tolist()],
        "scores": [round(v, 4) for v in det["scores"].tolist()],
        "labels": det["labels"].tolist(),
        "size": [width, height],
    }
    if "class_probs" in det:
        entry["class_probs"] = [[round(v, 4) for v in row] for row in det["class_probs"].tolist()]
        entry["objectness"] = [round(v, 4) for v in det["objectness"].tolist()]
    return entry


def _fuse_entries(
    entries: Sequence[dict[str, Any]], iou_threshold: float, C: int
) -> dict[str, Any]:
    """The members' cached labels of one image -> the ensemble's (``fuse_detections``)."""
    detections = [
        {
            "boxes": torch.tensor(e["boxes"], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(e["scores"], dtype=torch.float32).reshape(-1),
            "labels": torch.tensor(e["labels"], dtype=torch.int64).reshape(-1),
            "class_probs": torch.tensor(e["class_probs"], dtype=torch.float32).reshape(-1, C),
            "objectness": torch.tensor(e["objectness"], dtype=torch.float32).reshape(-1),
        }
        for e in entries
    ]
    width, height = entries[0]["size"]
    return _cache_entry(fuse_detections(detections, CACHE_FLOOR, iou_threshold), width, height)


def teacher_annotation(
    path: Path, labels: dict[str, Any], mapping: list[int], threshold: float, soft: bool = False
) -> Annotation:
    """An ``Annotation`` of the teacher's boxes above ``threshold`` (none: a negative image).

    ``soft``: with soft targets, each box's class distribution (the teacher's probabilities of
    the student's classes, normalised to sum 1) and the teacher's objectness.
    """
    width, height = labels["size"]
    keep = [
        k
        for k, (score, label) in enumerate(zip(labels["scores"], labels["labels"], strict=True))
        if score > threshold and mapping[label] >= 0
    ]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = torch.tensor([labels["boxes"][k] for k in keep], dtype=torch.float32).reshape(-1, 4)
    student_labels = torch.tensor([mapping[labels["labels"][k]] for k in keep], dtype=torch.int64)
    soft_targets = {}
    if soft:
        if "class_probs" not in labels:
            raise ValueError(f"{path}: the teacher's labels hold no class probabilities")
        C = max(mapping) + 1
        index = torch.tensor([m for m in mapping if m >= 0])
        teacher_cols = torch.tensor([t for t, m in enumerate(mapping) if m >= 0])
        probs = torch.zeros(len(keep), C)
        if keep:
            teacher_probs = torch.tensor([labels["class_probs"][k] for k in keep])
            probs[:, index] = teacher_probs[:, teacher_cols]
        probs = probs / probs.sum(1, keepdim=True).clamp(min=1e-6)
        soft_targets = {
            "class_probs": probs,
            "objectness": torch.tensor([labels["objectness"][k] for k in keep]).reshape(-1),
        }
    return Annotation(
        image_path=path,
        width=width,
        height=height,
        boxes=boxes * scale,
        labels=student_labels,
        difficult=torch.zeros(len(keep), dtype=torch.bool),
        **soft_targets,
    )


def fill_unlabelled_objects(
    annotation: Annotation, teacher_ann: Annotation, iou_threshold: float = 0.3
) -> Annotation:
    """Add the teacher's boxes that overlap no annotated box (objects the annotator missed).

    With soft teacher targets the annotated boxes keep hard ones (one-hot, certain)."""
    from torchvision.ops import box_iou

    if teacher_ann.soft:
        annotation = annotation.with_soft_targets(teacher_ann.class_probs.shape[1])
    if len(teacher_ann.boxes) == 0:
        return annotation
    if len(annotation.boxes):
        overlap = box_iou(teacher_ann.boxes, annotation.boxes).max(dim=1).values
        new = overlap < iou_threshold
    else:
        new = torch.ones(len(teacher_ann.boxes), dtype=torch.bool)
    soft = {}
    if teacher_ann.soft:
        soft = {
            key: torch.cat([getattr(annotation, key), getattr(teacher_ann, key)[new]])
            for key in ("class_probs", "objectness")
        }
    return Annotation(
        image_path=annotation.image_path,
        width=annotation.width,
        height=annotation.height,
        boxes=torch.cat([annotation.boxes, teacher_ann.boxes[new]]),
        labels=torch.cat([annotation.labels, teacher_ann.labels[new]]),
        difficult=torch.cat([annotation.difficult, teacher_ann.difficult[new]]),
        **soft,
    )


def foreign_objects(
    folders: Sequence[str | Path], split: str, student_names: Sequence[str]
) -> dict[Path, torch.Tensor]:
    """Per image, the boxes that VOC roots among ``folders`` annotate with a non-student class.

    Such an object is known to be none of the student's classes, whatever a teacher calls it
    (the teachers call most of ``raccoon``'s raccoons dogs or cats). Plain folders give none.
    """
    found: dict[Path, torch.Tensor] = {}
    for folder in map(Path, folders):
        if not voc_split_file(folder, split).is_file():
            continue
        names = voc_class_names(folder, split)
        foreign = torch.tensor([i for i, n in enumerate(names) if n not in student_names])
        if len(foreign) == 0:
            continue
        for ann in read_voc(folder, split, names):
            mask = torch.isin(ann.labels, foreign)
            if mask.any():
                found[ann.image_path] = ann.boxes[mask]
    return found


def drop_foreign_boxes(
    teacher_ann: Annotation,
    foreign: torch.Tensor | None,
    iou_threshold: float = 0.5,
    inside_threshold: float = 0.7,
) -> Annotation:
    """The teacher's boxes less those on a known foreign object, so that the object trains as
    background instead of as the class the teacher guessed.

    A box is on the object when its IoU with it is >= ``iou_threshold``, or when at least
    ``inside_threshold`` of the box's own area lies inside it: a part of a kangaroo (its head,
    its back) boxed as a dog is as wrong as the whole animal boxed so, and its IoU is small.
    """
    from torchvision.ops import box_area, box_iou

    if foreign is None or len(foreign) == 0 or len(teacher_ann.boxes) == 0:
        return teacher_ann
    iou = box_iou(teacher_ann.boxes, foreign)  # (teacher, foreign)
    area, foreign_area = box_area(teacher_ann.boxes)[:, None], box_area(foreign)[None, :]
    inter = iou * (area + foreign_area) / (1 + iou)  # from iou = inter / (a + b - inter)
    inside = inter / area.clamp(min=1e-9)
    on_foreign = (iou >= iou_threshold) | (inside >= inside_threshold)
    return teacher_ann.select(~on_foreign.any(dim=1))


def predict_teacher(
    teacher: Teacher,
    annotations: Sequence[Annotation],
    conf_threshold: float = 0.005,
    mirror: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """The teacher's detections of annotated images, boxes in each image's pixels (xyxy), for
    scoring it as ``yolov1-eval`` scores a checkpoint (plain resize, RGB in [0, 1]); ``mirror``:
    of the horizontally mirrored images, boxes mapped back onto the originals."""
    results = []
    for ann in tqdm(annotations, desc="teacher eval", leave=False):
        image, width, height = _load_for_teacher(ann.image_path, teacher.input_size)
        (det,) = teacher.detect((image.flip(-1) if mirror else image)[None], conf_threshold)
        boxes = det["boxes"] * torch.tensor([width, height, width, height], dtype=torch.float32)
        if mirror:
            boxes = unmirror_boxes(boxes, height, width)
        results.append({"boxes": boxes, "scores": det["scores"], "labels": det["labels"]})
    return results
