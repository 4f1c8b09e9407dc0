"""Decode + resize of a large JPEG (a 12-megapixel phone photo), without and with draft mode.

``python -m benchmarks.decode [--image PATH] [--size 448] [--repeats 10]``

Both columns run the service's own ``app.inference.decode_image``: ``keep_image=True`` is its
path without draft mode (the full-size image is decoded, as ``/v1/detect/render`` needs), the
default is the path ``/v1/detect`` takes, where a JPEG is decoded at 1/2, 1/4 or 1/8 scale.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from app.inference import decode_image

LARGE_SIZE = (4000, 3000)  # a 12-megapixel photo, landscape
IMAGES_DIR = Path(__file__).resolve().parents[2] / "shared" / "images"


def make_large_jpeg(source: bytes, size: tuple[int, int] = LARGE_SIZE, quality: int = 90) -> bytes:
    """Upscale the image in ``source`` to ``size`` (width, height) and encode it as a JPEG."""
    with Image.open(io.BytesIO(source)) as image:
        large = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    large.save(out, "JPEG", quality=quality)
    return out.getvalue()


def time_decode(data: bytes, size: int, repeats: int) -> dict[str, Any]:
    """Median milliseconds of ``decode_image`` on ``data``, without and with draft mode."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    result: dict[str, Any] = {"width": width, "height": height, "size": size, "repeats": repeats}
    for name, keep_image in (("full", True), ("draft", False)):
        decode_image(data, size, width * height, keep_image=keep_image)  # first-call costs
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            decode_image(data, size, width * height, keep_image=keep_image)
            times.append(time.perf_counter() - start)
        result[f"{name}_ms"] = statistics.median(times) * 1000
    result["speedup"] = result["full_ms"] / result["draft_ms"]
    return result


def format_decode(result: dict[str, Any]) -> str:
    """One markdown table from ``time_decode``'s result."""
    shape = f"{result['width']}x{result['height']} JPEG -> {result['size']}x{result['size']}"
    return "\n".join(
        [
            f"| decode + resize ({shape}) | median ms |",
            "|---|---:|",
            f"| full decode | {result['full_ms']:.1f} |",
            f"| draft mode (DCT scaling) | {result['draft_ms']:.1f} |",
            f"| speedup | {result['speedup']:.1f}x |",
        ]
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--image",
        type=Path,
        default=IMAGES_DIR / "dog.jpg",
        help="photo to upscale to 4000x3000 (default: ../shared/images/dog.jpg)",
    )
    parser.add_argument("--size", type=int, default=448, help="network input side, in pixels")
    parser.add_argument("--repeats", type=int, default=10, help="timed decodes per mode")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    if not args.image.is_file():
        sys.exit(f"benchmarks.decode: no image at {args.image}; pass --image PATH")
    result = time_decode(make_large_jpeg(args.image.read_bytes()), args.size, args.repeats)
    print(format_decode(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
