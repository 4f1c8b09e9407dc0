"""The types a batch travels in: what goes into a backend and what comes out of it.

Their own module, so that ``app.backends`` (which produces them) and ``app.inference`` (which
builds a backend and cuts its answers) both import them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Pixels = Any  # (3, size, size) float32 RGB in [0, 1]: a numpy array, or a torch tensor on CUDA


@dataclass(frozen=True)
class DetectOptions:
    """Per-request decoding parameters."""

    conf_threshold: float
    iou_threshold: float
    max_detections: int
    class_ids: frozenset[int] | None = None  # keep only these classes; None keeps all


@dataclass(frozen=True)
class Detections:
    """One image's detections, best first: numpy arrays on the CPU."""

    boxes: np.ndarray  # (K, 4) float32 xyxy, normalised to [0, 1]
    scores: np.ndarray  # (K,) float32, decreasing
    labels: np.ndarray  # (K,) int64 class ids
