"""Servable checkpoints: safetensors tensors plus JSON metadata; loading never unpickles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.metadata import (
    FORMAT_VERSION,
    METADATA_KEY,
    CheckpointError,
    architecture_of,
    file_sha256,
    read_metadata,
)
from model.network import IMAGENET_MEAN, IMAGENET_STD, YOLOv1

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "CheckpointError",
    "file_sha256",
    "load_checkpoint",
    "model_metadata",
    "read_metadata",
    "save_checkpoint",
    "update_metadata",
]


def model_metadata(model: YOLOv1, class_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The metadata that describes ``model``: architecture, S, B, C, input size and classes."""
    if len(class_names) != model.num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a model with {model.num_classes} classes"
        )
    return {
        "format_version": FORMAT_VERSION,
        "arch": model.arch,
        "architecture": model.arch_config.to_dict(),
        "grid_size": model.grid_size,
        "boxes_per_cell": model.boxes_per_cell,
        "num_classes": model.num_classes,
        "image_size": model.image_size,
        "class_names": list(class_names),
        "input": {
            "color": "RGB",
            "range": [0, 1],
            "resize": "plain (no letterbox)",
            "mean": model.pixel_mean.flatten().tolist(),
            "std": model.pixel_std.flatten().tolist(),
        },
    }


def save_checkpoint(
    path: str | Path,
    model: YOLOv1,
    metadata: dict[str, Any],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model``'s weights and metadata to a safetensors file.

    ``metadata`` must hold ``class_names``; anything else it holds (a ``training`` summary, for
    instance) is stored as well. The architecture fields are always taken from the model, so they
    cannot disagree with the tensors. ``dtype`` (float32, float16 or bfloat16) applies to
    floating-point tensors; loading converts back to float32.
    """
    if "class_names" not in metadata:
        raise ValueError("metadata must contain 'class_names'")
    full = {**metadata, **model_metadata(model, metadata["class_names"])}
    tensors = {
        name: (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()
        for name, t in model.state_dict().items()
        if not name.endswith("num_batches_tracked")
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(full)})
    tmp.chmod(0o644)  # readable by a service running as another user (safetensors writes 0600)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def model_from_metadata(
    meta: dict[str, Any], path: str | Path = "<metadata>", **overrides: int
) -> YOLOv1:
    """A freshly initialised model of the architecture, S, B, C and input normalisation that
    ``meta`` describes; ``overrides`` (``num_classes``, ``boxes_per_cell``, ``image_size``)
    replace the metadata's values. Raises ``ValueError`` for an impossible combination."""
    sizes = {k: meta[k] for k in ("num_classes", "boxes_per_cell", "image_size")} | overrides
    normalisation = meta.get("input", {})
    return YOLOv1(
        architecture_of(meta, path),
        **sizes,
        mean=tuple(normalisation.get("mean", IMAGENET_MEAN)),
        std=tuple(normalisation.get("std", IMAGENET_STD)),
    )


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[YOLOv1, dict[str, Any]]:
    """Load a checkpoint written by ``save_checkpoint``; return ``(model, metadata)`` in eval mode.

    Every tensor name and shape is checked against the architecture the metadata names before
    anything is copied. Raises ``CheckpointError`` naming the file and the problem.
    """
    path = Path(path)
    meta = read_metadata(path)
    try:
        model = model_from_metadata(meta, path)
    except ValueError as exc:
        raise CheckpointError(path, f"metadata describes no valid model ({exc})") from None
    expected = {
        k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
                raise CheckpointError(
                    path,
                    f"tensors disagree with the metadata's architecture {meta['arch']!r}: "
                    f"missing {missing[:3]}, unexpected {extra[:3]}",
                )
            state = {}
            for name, ref in expected.items():
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(ref.shape):
                    raise CheckpointError(
                        path,
                        f"tensor {name} has shape {shape}, metadata implies {tuple(ref.shape)}",
                    )
                state[name] = f.get_tensor(name).to(ref.dtype)
    except CheckpointError:
        raise
    except Exception as exc:  # truncated data sections surface here
        raise CheckpointError(path, f"cannot read tensors ({exc})") from None
    model.load_state_dict(state, strict=False)  # num_batches_tracked is not stored
    return model.to(device).eval(), meta


def update_metadata(path: str | Path, **changes: Any) -> dict[str, Any]:
    """Rewrite a checkpoint's metadata with ``changes``; the tensors are kept byte for byte."""
    path = Path(path)
    meta = {**read_metadata(path), **changes}
    tensors = load_file(str(path))
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    tmp.chmod(0o644)
    tmp.replace(path)
    return meta
