"""ONNX export of a YOLOv1 for serving, and a cache of exports keyed by the weights' content.

The exported graph maps ``images`` (N, 3, H, W) float32 RGB in [0, 1] (N dynamic, H = W =
``image_size``) to
- ``grid`` (N, S, S, C + 5B): the raw output, exactly as ``YOLOv1.forward``;
- ``boxes`` (N, S*S*B, 4): every predicted box, xyxy normalised to [0, 1] and clipped;
- ``scores`` (N, C, S*S*B): ``conf * class_score`` of every (box, class) pair, as
  ``model.postprocess.candidates`` computes them, in the layout ONNX ``NonMaxSuppression``
  takes.
Thresholds and NMS stay outside the graph, since they change per request.

Nothing here imports torch at module level: the service finds a cached export, or has one
written by a child process (``python -m model.export WEIGHTS OUT``), without loading PyTorch.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from model.metadata import file_sha256

if TYPE_CHECKING:
    from model.network import YOLOv1

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAMES = ("grid", "boxes", "scores")
# Part of the cache file name: bump it whenever the graph's inputs or outputs change, so that
# an export in an older layout is never picked up.
EXPORT_VERSION = 3  # 3: scores clamp both factors to [0, 1]
PROJECT_ROOT = Path(__file__).resolve().parent.parent

Exporter = Callable[[Path, Path], Path]  # (weights, out) -> out


def export_onnx(model: YOLOv1, path: str | Path, opset: int | None = None) -> Path:
    """Export ``model`` (BatchNorm folded, eval, float32, CPU) to one self-contained ONNX file.

    ``model`` is an unfolded YOLOv1 as built or loaded; it is not modified. ``opset=None`` takes
    the exporter's default. The file appears atomically: a crash leaves no partial ``path``.
    """
    import torch

    from model.network import prepare_for_inference
    from model.postprocess import candidates

    class Servable(torch.nn.Module):
        def __init__(self, network: torch.nn.Module, B: int, C: int):
            super().__init__()
            self.network, self.B, self.C = network, B, C

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            grid = self.network(images)
            boxes, scores = candidates(grid, self.B, self.C)
            return grid, boxes, scores.transpose(1, 2)

    path = Path(path)
    ready = prepare_for_inference(model, "cpu", torch.float32)
    servable = Servable(ready, model.boxes_per_cell, model.num_classes).eval()
    # Batch 2, not 1: torch.export specialises a size-1 dimension to the constant 1.
    example = torch.rand(2, 3, model.image_size, model.image_size)
    # The torch.export-based exporter (the default since torch 2.9) rather than the TorchScript
    # one, which 2.14 deprecates for removal and which loses the static output dims.
    batch = torch.export.Dim("batch", min=1)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique per writer
    start = time.perf_counter()
    try:
        torch.onnx.export(
            servable,
            (example,),
            tmp,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"images": {0: batch}},
            external_data=False,  # one file, so a single rename publishes it
            verbose=False,
        )
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("exported %s to %s in %.1f s", model.arch, path, time.perf_counter() - start)
    return path


def cached_onnx_path(weights_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the export of ``weights_path`` is cached: ``<dir>/<stem>.<sha256[:16]>.v<N>.onnx``.

    ``<dir>`` is ``cache_dir`` if given, else the weights file's directory. The name changes
    whenever the weights file's content (or ``EXPORT_VERSION``) does, so a stale export is
    never picked up.
    """
    weights_path = Path(weights_path)
    directory = Path(cache_dir) if cache_dir is not None else weights_path.parent
    return directory / _onnx_file_name(weights_path)


def _onnx_file_name(weights_path: Path, sha256: str | None = None) -> str:
    digest = sha256 or file_sha256(weights_path)
    return f"{weights_path.stem}.{digest[:16]}.v{EXPORT_VERSION}.onnx"


def export_in_subprocess(weights_path: Path, out: Path) -> Path:
    """Export ``weights_path`` to ``out`` in a child Python, so that PyTorch (and the exporter's
    memory) never enter this process. Raises ``RuntimeError`` with the child's last words."""
    run_module(["model.export", str(weights_path), str(out)], f"the ONNX export of {weights_path}")
    return out


def run_module(args: list[str], what: str) -> None:
    """``python -m <args>`` in a child with this project importable; on failure raise
    ``RuntimeError("<what> failed: <the child's last stderr line>")``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    command = [sys.executable, "-m", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise RuntimeError(f"{what} failed: {last}")
    logger.info("%s took %.1f s", what, time.perf_counter() - start)


def _writable(directory: Path) -> None:
    """Raise ``OSError`` unless a file can be created in ``directory`` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
        pass


def ensure_onnx(
    weights_path: str | Path,
    cache_dir: str | Path | None = None,
    *,
    replace: bool = False,
    exporter: Exporter = export_in_subprocess,
    sha256: str | None = None,
) -> Path:
    """Return the path of an export of ``weights_path``, exporting only when none is cached.

    The export goes to ``cache_dir`` if given, else beside the weights; if that directory
    cannot be written (a read-only volume, say), to ``<system temp dir>/yolov1-onnx``. An
    export already in either place is reused (so a read-only volume may ship one next to the
    weights) unless ``replace`` is set, which writes a fresh one: the caller's answer to a
    cached file it could not use. ``sha256``, the weights' hex digest if the caller has it,
    saves hashing the file again.
    """
    weights_path = Path(weights_path)
    primary = Path(cache_dir) if cache_dir is not None else weights_path.parent
    name = _onnx_file_name(weights_path, sha256)
    return cached_file(
        primary, name, "ONNX export", lambda path: exporter(weights_path, path), replace=replace
    )


def cached_file(
    primary: Path,
    name: str,
    what: str,
    make: Callable[[Path], Path],
    *,
    replace: bool = False,
    prepare: Callable[[], None] | None = None,
) -> Path:
    """``primary/name`` or ``<system temp dir>/yolov1-onnx/name`` if either exists (unless
    ``replace``), else ``make(path)`` at the first of them that can be written.

    The primary place is looked at before asking for a temp dir, which a read-only root may
    lack. ``prepare`` runs once before anything is made (to refuse early, say).
    """
    candidates = [primary / name]
    if not replace and candidates[0].is_file():
        logger.info("reusing the %s %s", what, candidates[0])
        return candidates[0]
    try:
        candidates.append(Path(tempfile.gettempdir()) / "yolov1-onnx" / name)
    except FileNotFoundError as exc:  # no writable temp dir at all
        logger.warning("no temporary directory for the %s (%s)", what, exc)
    if not replace and candidates[-1].is_file():
        logger.info("reusing the %s %s", what, candidates[-1])
        return candidates[-1]
    if prepare is not None:
        prepare()
    for path in candidates:
        try:
            _writable(path.parent)
        except OSError as exc:  # read-only, permission denied, a file where a directory should be
            logger.warning("cannot write the %s to %s (%s)", what, path, exc)
            continue
        return make(path)
    raise OSError(f"no writable place for the {what} {name}: tried {candidates}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.export", description="Export a checkpoint for ONNX Runtime."
    )
    parser.add_argument("weights", type=Path, help="a .safetensors checkpoint")
    parser.add_argument("out", type=Path, help="the .onnx file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(name)s: %(message)s")
    from model.checkpoint import load_checkpoint
    from model.metadata import CheckpointError

    try:
        model, _ = load_checkpoint(args.weights)
        export_onnx(model, args.out)
    except (CheckpointError, OSError) as exc:
        sys.exit(f"model.export: {exc}")


if __name__ == "__main__":
    main()
