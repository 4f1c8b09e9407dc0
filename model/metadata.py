"""A checkpoint's identity without PyTorch: its metadata, its content hash, its errors.

The service reads these before it decides whether it needs PyTorch at all (the ONNX Runtime
backend does not), so nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from model.config import ARCHITECTURES, ArchConfig

METADATA_KEY = "yolov1"
# 2: the metadata carries the architecture itself ("architecture"); 1 named a built-in one.
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, foreign or inconsistent."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read and validate only the metadata of a checkpoint (no tensors are loaded)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors raises several types for foreign or truncated files
        raise CheckpointError(path, f"not a readable safetensors file ({exc})") from None
    if raw is None:
        raise CheckpointError(path, f"safetensors file has no '{METADATA_KEY}' metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(path, f"metadata is not valid JSON ({exc})") from None
    missing = {"arch", "num_classes", "boxes_per_cell", "image_size", "class_names"} - set(meta)
    if missing:
        raise CheckpointError(path, f"metadata lacks {sorted(missing)}")
    architecture_of(meta, path)
    if len(meta["class_names"]) != meta["num_classes"]:
        raise CheckpointError(
            path,
            f"metadata says num_classes={meta['num_classes']} but lists "
            f"{len(meta['class_names'])} class names",
        )
    return meta


def architecture_of(meta: dict[str, Any], path: str | Path = "<metadata>") -> ArchConfig:
    """The architecture a checkpoint's metadata describes (its own, or a named built-in one)."""
    if "architecture" in meta:
        try:
            return ArchConfig.from_dict(meta["architecture"])
        except (ValueError, TypeError) as exc:
            raise CheckpointError(path, f"invalid architecture in the metadata ({exc})") from None
    if meta["arch"] not in ARCHITECTURES:
        raise CheckpointError(path, f"unknown architecture {meta['arch']!r}")
    return ARCHITECTURES[meta["arch"]]
