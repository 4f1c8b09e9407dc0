"""From upload bytes to detections: decode and resize, run a batch on the backend, draw boxes.

Decoding is defensive: the format is checked before any pixel is decoded, the pixel count is
read from the header (so a decompression bomb is refused without being decoded), and large
JPEGs are decoded at reduced scale. Boxes are reported in pixels of the uploaded image after
its EXIF orientation. When serving on CUDA, JPEGs are decoded, resized and scaled on the GPU.

On the CPU nothing here needs PyTorch (PIL decodes and resizes, numpy carries the pixels), so
a service on the ONNX Runtime backend never loads it; the GPU path imports it when used.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from app.backends import Backend, create_backend
from app.detections import Detections, DetectOptions, Pixels
from model.metadata import file_sha256, read_metadata
from model.quantize import QuantizeSettings

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}  # orientations that rotate by 90 degrees
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_TORCHVISION_JPEG_MODES = {"RGB", "L"}  # CMYK and YCCK JPEGs go through PIL
_JPEG_END = b"\xff\xd9"  # the EOI marker
BOX_COLOUR = (255, 64, 32)


class ImageError(ValueError):
    """An upload the service cannot use; the subclass says why."""


class CorruptImage(ImageError):
    """Empty, truncated or otherwise undecodable."""


class UnsupportedImage(ImageError):
    """Not one of ``ACCEPTED_FORMATS``."""


class ImageTooLarge(ImageError):
    """More pixels than allowed, as declared by the header."""


@dataclass(frozen=True)
class DecodedImage:
    pixels: Pixels  # plainly resized to the network's input; numpy unless decoded on a GPU
    width: int  # of the upload after EXIF orientation, in pixels
    height: int
    image: Image.Image | None = None  # the oriented full-size RGB image, when asked for


def decode_image(
    data: bytes,
    size: int,
    max_pixels: int,
    keep_image: bool = False,
    device: str | None = None,
    torchvision_jpeg: bool | None = None,
) -> DecodedImage:
    """Decode an upload into the network's input; raise an ``ImageError`` subclass if unusable.

    ``keep_image`` also returns the oriented RGB image at full size (for drawing on); without
    it a JPEG is decoded at the smallest DCT scale that still gives ``size`` pixels a side.

    ``device`` None (or "cpu") gives a numpy array from PIL. Any other torch device (such as
    "cuda:0") gives a torch tensor there; with ``torchvision_jpeg`` (by default when ``device``
    is CUDA) a JPEG is then decoded by torchvision straight onto ``device`` (nvJPEG on CUDA) and
    resized there. Other formats, ``keep_image``, and JPEGs torchvision cannot decode go through
    PIL, whose errors are the ones raised. The header checks come first either way.
    """
    if torchvision_jpeg is None:
        torchvision_jpeg = device is not None and device.startswith("cuda")
    if not data:
        raise CorruptImage("the uploaded file is empty")
    try:
        # Only the accepted formats' header parsers ever see the bytes.
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise UnsupportedImage("not a JPEG, PNG, WebP or BMP image") from None
    except Image.DecompressionBombError:  # PIL's own guard, far over the limit
        raise ImageTooLarge(f"image is over the limit of {max_pixels} pixels") from None
    except Exception as exc:  # a recognised but malformed header
        raise CorruptImage(f"cannot read the image header ({exc})") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"image is {width}x{height} pixels, over the limit of {max_pixels} pixels"
            )
        orientation = _orientation(image)
        if torchvision_jpeg and not keep_image and _torchvision_can_decode(image, data):
            try:
                tensor = decode_jpeg_tensor(data, size, orientation, device or "cpu")
            except Exception as exc:  # PIL decides: it decodes the image or names the fault
                logger.debug("torchvision cannot decode a JPEG (%s); using PIL", exc)
            else:
                return DecodedImage(tensor, *_oriented_size(image.size, orientation))
        try:
            decoded = _decode(image, size, keep_image, orientation)
        except MemoryError:
            raise
        except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, ...
            raise CorruptImage(f"cannot decode the image ({exc})") from None
    if device is None or device == "cpu":
        return decoded
    import torch

    return replace(decoded, pixels=torch.from_numpy(decoded.pixels).to(device))


def _torchvision_can_decode(image: Image.Image, data: bytes) -> bool:
    # nvJPEG need not fail on a truncated stream as PIL does; such a file (no EOI marker at
    # the end) goes to PIL, which reports it. So does one with data after its EOI marker.
    return (
        image.format == "JPEG"
        and image.mode in _TORCHVISION_JPEG_MODES
        and data.rstrip(b"\0").endswith(_JPEG_END)
    )


def decode_jpeg_tensor(data: bytes, size: int, orientation: int, device: str) -> torch.Tensor:
    """Decode JPEG ``data`` on ``device`` (nvJPEG on CUDA) to (3, size, size) float32 in [0, 1].

    ``orientation`` is the EXIF tag read from the header, applied here rather than by
    ``decode_jpeg``, which applies it on the CPU only: the CPU run then tests the GPU's code.
    Raises whatever torchvision raises for a stream it cannot decode.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # (L,) on the CPU, as required
    pixels = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=torch.device(device))
    upright = _orient_tensor(pixels, orientation)
    resized = F.resize(upright, [size, size], antialias=True)  # (3, size, size)
    return F.to_dtype(resized, torch.float32, scale=True)


def _orient_tensor(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, h, w) as stored -> upright, as ``_UPRIGHT[orientation]`` does to a PIL image."""
    rows, cols = -2, -1
    if orientation == 2:
        return pixels.flip(cols)
    if orientation == 3:
        return pixels.flip(rows, cols)
    if orientation == 4:
        return pixels.flip(rows)
    if orientation == 5:
        return pixels.transpose(rows, cols)
    if orientation == 6:
        return pixels.rot90(-1, (rows, cols))  # clockwise
    if orientation == 7:
        return pixels.transpose(rows, cols).flip(rows, cols)
    if orientation == 8:
        return pixels.rot90(1, (rows, cols))  # anticlockwise
    return pixels


def _oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) as stored -> (width, height) after the EXIF orientation."""
    width, height = size
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


def _decode(image: Image.Image, size: int, keep_image: bool, orientation: int) -> DecodedImage:
    width, height = _oriented_size(image.size, orientation)
    if image.format == "JPEG" and not keep_image:
        # Decode at 1/2, 1/4 or 1/8 scale when that still covers the input size: the cost
        # then follows the network's input, not the upload. The size changes; the geometry
        # (``width``, ``height`` above) does not.
        image.draft("RGB", (size, size))
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
    oriented = _to_rgb(image)
    # As at evaluation (model.data.build_transform): a plain antialiased bilinear resize, then
    # [0, 1]. PIL's filter is the one torchvision's antialiased uint8 resize reproduces.
    resized = oriented.resize((size, size), Image.Resampling.BILINEAR)
    # HWC uint8 -> CHW float32 / 255 in one pass (no float HWC copy, no transposed temporary).
    pixels = np.empty((3, size, size), dtype=np.float32)
    np.divide(np.asarray(resized).transpose(2, 0, 1), np.float32(255), out=pixels)
    return DecodedImage(pixels, width, height, oriented if keep_image else None)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag, 1 (as stored) when absent, unreadable or invalid."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not make a decodable image unusable
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert("RGB") clips 16-bit values at 255 (a white image): keep the top 8 bits.
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(grey.astype(np.uint8))  # (h, w) uint8: mode L
    return image.convert("RGB")


@dataclass(frozen=True)
class Job:
    """One image waiting for inference."""

    image: Pixels  # (3, H, W) float32 in [0, 1]
    options: DetectOptions


def select(found: Detections, options: DetectOptions) -> Detections:
    """Keep ``options.class_ids`` (all when None), then the best ``options.max_detections``.

    ``found`` is sorted by decreasing score, as both backends return it; the class filter
    comes first, so that a filtered answer still holds up to ``max_detections`` of those
    classes.
    """
    keep = slice(None)
    if options.class_ids is not None:
        keep = np.isin(found.labels, np.array(sorted(options.class_ids), dtype=np.int64))
    limit = options.max_detections
    return Detections(
        found.boxes[keep][:limit], found.scores[keep][:limit], found.labels[keep][:limit]
    )


class Detector:
    """A checkpoint behind a backend: a batch of jobs in, one ``Detections`` per job out."""

    def __init__(self, backend: Backend, metadata: dict[str, Any], weights: Path, version: str):
        self.backend = backend
        self.metadata = metadata
        self.weights = weights
        self.version = version
        self.class_names: list[str] = list(metadata["class_names"])
        self.image_size: int = metadata["image_size"]
        self.num_classes: int = metadata["num_classes"]  # C
        self.boxes_per_cell: int = metadata["boxes_per_cell"]  # B

    @classmethod
    def load(
        cls,
        weights: str | Path,
        device: str,
        backend: str = "auto",
        half: bool = False,
        lanes: int | None = None,
        precision: str = "fp32",
        calibration_data: Sequence[Path] = (),
        quantize: QuantizeSettings = QuantizeSettings(),
    ) -> Detector:
        """Read ``weights`` and build the backend; raises ``CheckpointError`` or ``ValueError``.

        On the ONNX Runtime backend only the metadata is read here: the tensors go through
        the export (see ``app.backends.create_backend``, which also explains ``precision``).
        """
        weights = Path(weights)
        metadata = read_metadata(weights)
        digest = file_sha256(weights)  # the version, and the key of the ONNX export's cache
        runner = create_backend(
            backend, weights, metadata, device, half=half, sha256=digest, lanes=lanes,
            precision=precision, calibration_data=calibration_data, quantize=quantize,
        )  # fmt: skip
        return cls(runner, metadata, weights, digest[:12])

    def __call__(self, jobs: list[Job], concurrent: bool = False) -> list[Detections]:
        """``concurrent``: one of several batches running at once (see ``Backend.lanes``)."""
        if not jobs:
            return []
        images, options = [job.image for job in jobs], [job.options for job in jobs]
        found = self.backend.detect(images, options, concurrent=concurrent)
        return [select(f, job.options) for f, job in zip(found, jobs, strict=True)]

    def warm_up(self) -> None:
        """Run one batch of one blank image, so the first request pays no first-call costs."""
        blank = np.zeros((3, self.image_size, self.image_size), dtype=np.float32)
        for concurrent in (False, True) if self.backend.lanes > 1 else (False,):
            self([Job(blank, DetectOptions(0.5, 0.5, 1))], concurrent=concurrent)


def to_pixels(boxes_xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale (K, 4) xyxy boxes normalised to [0, 1] to pixels of a ``width`` x ``height`` image.

    The network input is a plain resize of the whole image, so the normalised coordinates map
    to the image's pixels by its two side lengths.
    """
    return boxes_xyxy * np.array([width, height, width, height], dtype=boxes_xyxy.dtype)


def draw_detections(
    image: Image.Image, boxes_xyxy: list[tuple[float, float, float, float]], labels: list[str]
) -> bytes:
    """Draw pixel ``boxes_xyxy`` with their ``labels`` on a copy of ``image``; return a JPEG."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(canvas.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(canvas.size) / 50)))
    for (x1, y1, x2, y2), label in zip(boxes_xyxy, labels, strict=True):
        draw.rectangle((x1, y1, x2, y2), outline=BOX_COLOUR, width=line)
        left, top, right, bottom = font.getbbox(label)
        text_w, text_h = right - left + 2 * line, bottom - top + 2 * line
        text_y = y1 - text_h if y1 >= text_h else y1  # above the box, unless at the top edge
        draw.rectangle((x1, text_y, x1 + text_w, text_y + text_h), fill=BOX_COLOUR)
        draw.text((x1 + line - left, text_y + line - top), label, fill=(255, 255, 255), font=font)
    out = io.BytesIO()
    canvas.save(out, "JPEG", quality=90)
    return out.getvalue()
