"""Upload decoding: formats, the pixel limit from the header, EXIF orientation, odd modes."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from builders import EXIF_STORE, encode, quadrant
from PIL import Image

from app.inference import CorruptImage, ImageTooLarge, UnsupportedImage, decode_image

SIZE = 128
LIMIT = 40_000_000


def png(width: int, height: int, pixels: bytes = b"") -> bytes:
    """A PNG that declares ``width`` x ``height``; ``pixels`` is its (compressed) data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b""))  # fmt: skip


def quadrant_means(tensor: np.ndarray) -> list[float]:
    half = SIZE // 2
    q = tensor.mean(0)
    return [q[:half, :half].mean(), q[:half, half:].mean(), q[half:, :half].mean(),
            q[half:, half:].mean()]  # fmt: skip


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_image_and_its_size(orientation, fmt):
    shown = quadrant(96, 64)
    stored = shown if EXIF_STORE[orientation] is None else shown.transpose(EXIF_STORE[orientation])
    decoded = decode_image(encode(stored, fmt, orientation), SIZE, LIMIT)
    assert (decoded.width, decoded.height) == (96, 64)
    top_left, *others = quadrant_means(decoded.pixels)
    assert top_left > 0.9 and max(others) < 0.1


def test_a_broken_exif_orientation_is_ignored():
    exif = Image.Exif()
    exif[0x0112] = 77  # no such orientation
    data = encode(quadrant(96, 64), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, SIZE, LIMIT)
    assert (decoded.width, decoded.height) == (96, 64)
    garbage = encode(quadrant(96, 64), "JPEG", exif=b"Exif\x00\x00MM\x00*\xff\xff")
    assert decode_image(garbage, SIZE, LIMIT).width == 96


def test_a_large_jpeg_is_decoded_reduced_but_reports_its_full_oriented_size():
    shown = quadrant(2400, 1600)
    data = encode(shown.transpose(EXIF_STORE[6]), "JPEG", orientation=6)
    decoded = decode_image(data, SIZE, LIMIT)
    assert (decoded.width, decoded.height) == (2400, 1600)
    assert decoded.pixels.shape == (3, SIZE, SIZE) and decoded.pixels.dtype == np.float32
    top_left, *others = quadrant_means(decoded.pixels)
    assert top_left > 0.9 and max(others) < 0.1
    kept = decode_image(data, SIZE, LIMIT, keep_image=True)
    assert kept.image is not None and kept.image.size == (2400, 1600)  # full size for drawing


@pytest.mark.parametrize("side", [7000, 100_000])  # under and over twice PIL's own limit
def test_a_decompression_bomb_is_refused_from_its_header(side):
    # 100000 x 100000 RGB would take 30 GB decoded; the file is a hundred bytes.
    with pytest.raises(ImageTooLarge, match="over the limit of 40000000 pixels"):
        decode_image(png(side, side), SIZE, LIMIT)
    with pytest.raises(ImageTooLarge, match="40x30 pixels, over the limit of 1000"):
        decode_image(encode(quadrant(40, 30)), SIZE, max_pixels=1000)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", CorruptImage),
        (np.random.default_rng(0).bytes(5000), UnsupportedImage),
        (encode(Image.new("RGB", (8, 8)), "GIF"), UnsupportedImage),
        (encode(Image.new("RGB", (8, 8)), "TIFF"), UnsupportedImage),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", UnsupportedImage),
        (encode(quadrant(300, 200), "JPEG")[:600], CorruptImage),
        (encode(quadrant(300, 200), "PNG")[:120], CorruptImage),
        (encode(quadrant(300, 200), "WEBP")[:100], CorruptImage),
        (png(64, 64), CorruptImage),
    ],
    ids=["empty", "random", "gif", "tiff", "svg", "cut-jpeg", "cut-png", "cut-webp", "no-data"],
)
def test_unusable_uploads_raise_the_matching_error(data, error):
    with pytest.raises(error):
        decode_image(data, SIZE, LIMIT)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (50, 40), 128),
        Image.new("RGBA", (50, 40), (10, 20, 30, 0)),
        Image.new("P", (50, 40), 3),
        Image.new("1", (50, 40), 1),
        Image.new("RGB", (1, 1), (255, 0, 0)),
        Image.new("RGB", (1, 10000), (0, 255, 0)),
    ],
    ids=["grey", "rgba", "palette", "bilevel", "1x1", "1x10000"],
)
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP"])
def test_odd_modes_and_shapes_decode_to_rgb(image, fmt):
    if fmt == "WEBP" and image.mode in ("1", "P"):
        image = image.convert("RGB")
    decoded = decode_image(encode(image, fmt), SIZE, LIMIT)
    assert decoded.pixels.shape == (3, SIZE, SIZE)
    assert decoded.pixels.min() >= 0 and decoded.pixels.max() <= 1
    assert (decoded.width, decoded.height) == image.size


def test_sixteen_bit_grey_keeps_its_range():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    decoded = decode_image(encode(Image.fromarray(ramp)), SIZE, LIMIT)
    row = decoded.pixels[0, 0]
    assert row[0] < 0.05 and row[-1] > 0.95  # not clipped to white
    assert np.all(row[1:] >= row[:-1] - 1e-6)


def test_cmyk_jpeg_is_converted():
    data = encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")
    decoded = decode_image(data, SIZE, LIMIT)
    red, green, blue = decoded.pixels.mean((1, 2)).tolist()
    assert red > 0.8 and green < 0.2 and blue < 0.2


@pytest.mark.parametrize("size", [(333, 250), (128, 128), (90, 200)])
def test_the_resize_is_the_one_training_and_evaluation_use(size):
    """PIL's bilinear filter against torchvision's antialiased resize (model.data's transform):
    the same picture, within one grey level, on a noisy image where any shift would show."""
    from torchvision.transforms.v2 import functional as F

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    decoded = decode_image(encode(image, "PNG"), SIZE, LIMIT)
    reference = F.to_dtype(
        F.resize(F.pil_to_tensor(image), [SIZE, SIZE], antialias=True), torch.float32, scale=True
    )
    assert np.abs(decoded.pixels - reference.numpy()).max() <= 1 / 255 + 1e-6
