"""YOLOv1 (Redmon et al. 2016): network, target encoding, loss, decoding + NMS, checkpoints.

The names below load on first use (PEP 562), so that ``import model.metadata`` (what the
service needs to serve through ONNX Runtime) does not pull in PyTorch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# Public name -> the submodule that defines it.
_EXPORTS = {
    "ARCHITECTURES": "model.config",
    "VOC_CLASSES": "model.config",
    "CheckpointError": "model.metadata",
    "YOLOv1": "model.network",
    "YOLOv1Loss": "model.loss",
    "build_model": "model.network",
    "decode_predictions": "model.boxes",
    "encode_targets": "model.boxes",
    "fold_batchnorm": "model.network",
    "load_checkpoint": "model.checkpoint",
    "postprocess": "model.postprocess",
    "prepare_for_inference": "model.network",
    "save_checkpoint": "model.checkpoint",
}
__all__ = [
    "ARCHITECTURES",
    "VOC_CLASSES",
    "CheckpointError",
    "YOLOv1",
    "YOLOv1Loss",
    "build_model",
    "decode_predictions",
    "encode_targets",
    "fold_batchnorm",
    "load_checkpoint",
    "postprocess",
    "prepare_for_inference",
    "save_checkpoint",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from model.boxes import decode_predictions, encode_targets
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.config import ARCHITECTURES, VOC_CLASSES
    from model.loss import YOLOv1Loss
    from model.metadata import CheckpointError
    from model.network import YOLOv1, build_model, fold_batchnorm, prepare_for_inference
    from model.postprocess import postprocess


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule model.postprocess sets the package's ``postprocess`` to that
        # module; the public name is the function, which __getattr__ then loads.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
