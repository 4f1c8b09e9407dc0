"""YOLOv1 (Redmon et al. 2016): network, target encoding, loss, decoding + NMS, checkpoints."""

from model.boxes import decode_predictions, encode_targets
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import ARCHITECTURES, VOC_CLASSES
from model.loss import YOLOv1Loss
from model.network import YOLOv1, build_model, fold_batchnorm, prepare_for_inference
from model.postprocess import postprocess

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
