"""Calibrate and write the int8 engine of a checkpoint: ``python -m app.calibration W [OUT]``.

The calibration images are decoded and resized by ``app.inference.decode_image``, exactly as
uploads are, so the ranges the quantizer measures are those the served network sees. The
service runs this module as a child process (``model.quantize.quantize_in_subprocess``), so
that neither the float export nor the calibration's memory stays in the serving process.
Without ``OUT`` the engine goes where the service looks for it: beside the weights, under the
name ``model.quantize.int8_file_name`` gives it (so ``docker build`` copies it into the image).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from app.inference import ImageError, decode_image
from model.export import ensure_onnx
from model.metadata import CheckpointError, read_metadata
from model.quantize import (
    QuantizeSettings,
    calibration_files,
    int8_file_name,
    quantize_onnx,
    training_data,
)

logger = logging.getLogger(__name__)

MAX_CALIBRATION_PIXELS = 40_000_000  # the service's default upload limit


def load_calibration_images(files: Sequence[Path], image_size: int) -> list[np.ndarray]:
    """Each file as the service feeds it to the network: (3, size, size) float32 in [0, 1].

    Decoded and resized by ``app.inference.decode_image``, so the calibrated ranges are those
    of served inputs. Undecodable files are skipped with a warning; raises ``ValueError`` when
    none is usable.
    """
    images = []
    for path in files:
        try:
            data = path.read_bytes()
            images.append(decode_image(data, image_size, MAX_CALIBRATION_PIXELS).pixels)
        except (ImageError, OSError) as exc:
            logger.warning("skipping calibration image %s: %s", path, exc)
    if not images:
        where = sorted({str(f.parent) for f in files}) or ["(no files)"]
        raise ValueError(
            f"no usable calibration image: none of the {len(files)} files in {', '.join(where)} "
            "could be decoded"
        )
    return images


def quantize_weights(
    weights_path: Path, out: Path, data: Sequence[Path], settings: QuantizeSettings
) -> Path:
    """Float export (cached) -> calibration images -> int8 engine at ``out``: in this process."""
    meta = read_metadata(weights_path)
    files = calibration_files(data, settings.split, settings.images)
    images = load_calibration_images(files, meta["image_size"])
    float_path = ensure_onnx(weights_path, out.parent)
    return quantize_onnx(float_path, out, images, settings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m app.calibration",
        description="Write the int8 ONNX Runtime engine of a checkpoint.",
    )
    parser.add_argument("weights", type=Path, help="a .safetensors checkpoint")
    parser.add_argument(
        "out", type=Path, nargs="?", help="the .onnx file to write (default: the service's cache)"
    )
    parser.add_argument(
        "--data",
        nargs="+",
        type=Path,
        help="calibration folders: VOC roots or folders of images (default: the training data "
        "the checkpoint records)",
    )
    defaults = QuantizeSettings()
    parser.add_argument("--images", type=int, default=defaults.images)
    parser.add_argument("--split", default=defaults.split)
    parser.add_argument("--method", choices=("minmax", "percentile", "entropy"), default="minmax")
    parser.add_argument("--no-reduce-range", dest="reduce_range", action="store_false")
    parser.add_argument("--no-equalize", dest="equalize", action="store_false")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(name)s: %(message)s")
    try:
        settings = QuantizeSettings(
            args.images, args.split, args.method, args.reduce_range, args.equalize
        )
        data = args.data or training_data(read_metadata(args.weights))
        out = args.out or args.weights.parent / int8_file_name(args.weights, settings, data)
        print(quantize_weights(args.weights, out, data, settings))
    except (CheckpointError, ValueError, OSError, RuntimeError) as exc:
        sys.exit(f"app.calibration: {exc}")


if __name__ == "__main__":
    main()
