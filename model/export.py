"""ONNX export of a YOLOv1, and a cache of exports keyed by the weights file's content.

The exported graph maps ``images`` (N, 3, H, W) float32 RGB in [0, 1] to the raw ``grid``
(N, S, S, C + 5B), exactly as ``YOLOv1.forward`` does; N is dynamic, H = W = ``image_size``.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from pathlib import Path

import onnx
import torch
from google.protobuf.message import DecodeError

from model.checkpoint import file_sha256
from model.network import YOLOv1, prepare_for_inference

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "grid"


def export_onnx(model: YOLOv1, path: str | Path, opset: int | None = None) -> Path:
    """Export ``model`` (BatchNorm folded, eval, float32, CPU) to one self-contained ONNX file.

    ``model`` is an unfolded YOLOv1 as built or loaded; it is not modified. ``opset=None`` takes
    the exporter's default. The file appears atomically: a crash leaves no partial ``path``.
    """
    path = Path(path)
    ready = prepare_for_inference(model, "cpu", torch.float32)
    # Batch 2, not 1: torch.export specialises a size-1 dimension to the constant 1.
    example = torch.rand(2, 3, model.image_size, model.image_size)
    # The torch.export-based exporter (the default since torch 2.9) rather than the TorchScript
    # one, which 2.14 deprecates for removal and which loses the static S, S, C+5B output dims.
    batch = torch.export.Dim("batch", min=1)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique per writer
    start = time.perf_counter()
    try:
        torch.onnx.export(
            ready,
            (example,),
            tmp,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={INPUT_NAME: {0: batch}},
            external_data=False,  # one file, so a single rename publishes it
            verbose=False,
        )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("exported %s to %s in %.1f s", model.arch, path, time.perf_counter() - start)
    return path


def _onnx_file_name(weights_path: Path) -> str:
    return f"{weights_path.stem}.{file_sha256(weights_path)[:16]}.onnx"


def cached_onnx_path(weights_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the export of ``weights_path`` is cached: ``<dir>/<stem>.<sha256[:16]>.onnx``.

    ``<dir>`` is ``cache_dir`` if given, else the weights file's directory. The name changes
    whenever the weights file's content does, so a stale export is never picked up.
    """
    weights_path = Path(weights_path)
    directory = Path(cache_dir) if cache_dir is not None else weights_path.parent
    return directory / _onnx_file_name(weights_path)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """A graph input's or output's shape: ints for fixed dimensions, names for dynamic ones."""
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param
        for d in value.type.tensor_type.shape.dim
    ]


def _matches_model(path: Path, model: YOLOv1) -> bool:
    """Whether ``path`` is a readable ONNX file with ``model``'s input and output signature."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except (OSError, DecodeError):  # missing, under a non-directory, or not an ONNX protobuf
        return False
    inputs = [(v.name, _dims(v)) for v in graph.input]
    outputs = [(v.name, _dims(v)) for v in graph.output]
    H, S = model.image_size, model.grid_size
    K = model.num_classes + 5 * model.boxes_per_cell  # C + 5B
    return (
        [(name, dims[1:]) for name, dims in inputs] == [(INPUT_NAME, [3, H, H])]
        and [(name, dims[1:]) for name, dims in outputs] == [(OUTPUT_NAME, [S, S, K])]
        and isinstance(inputs[0][1][0], str)  # a named, i.e. dynamic, batch dimension
    )


def ensure_onnx(
    model: YOLOv1, weights_path: str | Path, cache_dir: str | Path | None = None
) -> Path:
    """Return the path of a valid ONNX export of ``model``, exporting only when none is cached.

    ``model`` must hold the weights of ``weights_path``, whose content keys the cache. The export
    goes to ``cache_dir`` if given, else beside the weights; if that directory cannot be written
    (a read-only volume, say), to ``<system temp dir>/yolov1-onnx``. A valid export already in
    any of these places is reused, so a read-only volume may ship one next to the weights.
    """
    weights_path = Path(weights_path)
    name = _onnx_file_name(weights_path)
    primary = Path(cache_dir) if cache_dir is not None else weights_path.parent
    candidates = [primary / name, Path(tempfile.gettempdir()) / "yolov1-onnx" / name]
    for path in candidates:
        if _matches_model(path, model):
            logger.info("reusing the ONNX export %s", path)
            return path
    for path in candidates:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return export_onnx(model, path)
        except OSError as exc:  # read-only, permission denied, a file where a directory should be
            logger.warning("cannot write the ONNX export to %s (%s)", path, exc)
    raise OSError(f"no writable place for the ONNX export of {weights_path}: tried {candidates}")
