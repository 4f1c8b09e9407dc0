"""The GPU path: torchvision JPEG decoding (run on the CPU here), its fallback to PIL, the
service's choice of decoder, and, where CUDA exists, nvJPEG decoding into the torch backend."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.io
from builders import EXIF_STORE
from PIL import Image

import app.inference
import app.service
from app.backends import TorchBackend
from app.inference import CorruptImage, decode_image
from model import build_model

# torchvision 0.29 deprecates its image decoders (for TorchCodec); they still work.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

SIZE = 128
LIMIT = 40_000_000
CPU = "cpu"


def host(pixels) -> np.ndarray:
    """Decoded pixels as numpy: torchvision's decoder gives a tensor, PIL's an array."""
    return pixels.cpu().numpy() if torch.is_tensor(pixels) else pixels


def photo(width: int = 200, height: int = 120, seed: int = 0) -> Image.Image:
    """Smooth gradients, a bright top-left quarter and some noise: a JPEG-friendly picture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 160
    pixels[: height // 2, : width // 2] += 90
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, orientation: int = 1) -> bytes:
    stored = image if EXIF_STORE[orientation] is None else image.transpose(EXIF_STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    stored.save(out, "JPEG", quality=92, exif=exif.tobytes())
    return out.getvalue()


def torchvision_decode(data: bytes, **kw):
    return decode_image(data, SIZE, LIMIT, device=CPU, torchvision_jpeg=True, **kw)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_torchvision_decode_matches_pil(orientation):
    data = jpeg(photo(), orientation)
    reference = decode_image(data, SIZE, LIMIT)
    decoded = torchvision_decode(data)
    assert (decoded.width, decoded.height) == (reference.width, reference.height) == (200, 120)
    assert decoded.pixels.shape == (3, SIZE, SIZE) and decoded.pixels.dtype == torch.float32
    assert decoded.image is None
    # The two libjpeg builds and upsamplers differ by a few levels, not by a misplaced pixel.
    assert np.abs(host(decoded.pixels) - reference.pixels).mean() < 0.02


def test_torchvision_decode_is_the_one_used(monkeypatch):
    calls = []
    real = app.inference.decode_jpeg_tensor

    def spy(*args):
        calls.append(args[2:])
        return real(*args)

    monkeypatch.setattr(app.inference, "decode_jpeg_tensor", spy)
    torchvision_decode(jpeg(photo(), 6))
    assert calls == [(6, CPU)]  # (orientation, device)


def test_torchvision_failure_falls_back_to_pil(monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("nvjpeg: NVJPEG_STATUS_JPEG_NOT_SUPPORTED")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", broken)  # imported where it is used
    data = jpeg(photo(), 8)
    np.testing.assert_array_equal(
        host(torchvision_decode(data).pixels), decode_image(data, SIZE, LIMIT).pixels
    )


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_a_truncated_jpeg_is_corrupt(cut):
    data = jpeg(photo())
    with pytest.raises(CorruptImage):
        torchvision_decode(data[: int(len(data) * cut)])


def test_a_broken_scan_header_is_corrupt():
    data = bytearray(jpeg(photo()))
    scan = data.rindex(b"\xff\xda")  # start of scan
    data[scan + 2 : scan + 40] = b"\xff" * 38  # a wrong segment length, markers where none fit
    with pytest.raises(CorruptImage):
        torchvision_decode(bytes(data))


def test_a_scan_cut_short_but_closed_decodes_as_with_pil():
    data = jpeg(photo())
    closed = data[: len(data) // 2] + b"\xff\xd9"  # libjpeg fills the rest in, in both
    reference = decode_image(closed, SIZE, LIMIT)
    assert np.abs(host(torchvision_decode(closed).pixels) - reference.pixels).mean() < 0.02


@pytest.mark.parametrize(
    "image", [Image.new("CMYK", (64, 48), (0, 255, 0, 0)), photo().convert("L")]
)
def test_other_jpeg_modes_decode_as_with_pil(image):
    data = io.BytesIO()
    image.save(data, "JPEG")
    decoded = torchvision_decode(data.getvalue())
    reference = decode_image(data.getvalue(), SIZE, LIMIT)
    assert np.abs(host(decoded.pixels) - reference.pixels).mean() < 0.02


def test_keep_image_and_other_formats_use_pil():
    out = io.BytesIO()
    photo().save(out, "PNG")
    png = torchvision_decode(out.getvalue())
    np.testing.assert_array_equal(
        host(png.pixels), decode_image(out.getvalue(), SIZE, LIMIT).pixels
    )
    kept = torchvision_decode(jpeg(photo(), 6), keep_image=True)
    assert kept.image is not None and kept.image.size == (200, 120)


# ---- the service picks the decoder by its backend's device ----------------------------------


class OnDevice:
    """The real backend, reporting ``device``: the service's choice runs, CUDA is never touched."""

    def __init__(self, backend, device: str):
        self.backend, self.device = backend, device
        self.name, self.dtype, self.lanes = backend.name, backend.dtype, backend.lanes

    def detect(self, images, options, concurrent=False):
        return self.backend.detect(images, options)


@pytest.mark.anyio
@pytest.mark.parametrize(("device", "expected"), [("cpu", None), ("cuda:0", "cuda:0")])
async def test_the_service_decodes_on_its_backends_cuda_device(
    serve, monkeypatch, device, expected
):
    asked = []

    def recording_decode(data, *args, device=None, **kw):
        asked.append(device)
        return decode_image(data, *args, **kw)  # on the CPU, where the real backend runs

    monkeypatch.setattr(app.service, "decode_image", recording_decode)
    async with serve() as (client, running):
        service = running.state.service
        service.detector.backend = OnDevice(service.detector.backend, device)
        files = {"image": ("x.jpg", jpeg(photo()), "image/jpeg")}
        r = await client.post("/v1/detect", files=files)
    assert r.status_code == 200, r.text
    assert r.json()["image"] == {"width": 200, "height": 120}
    assert asked == [expected]


# ---- on a real GPU ----------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("half", [False, True])
def test_cuda_decode_into_the_torch_backend_matches_the_cpu(half):
    torch.manual_seed(0)
    model = build_model("yolov1-tiny", image_size=SIZE).eval()
    cuda = "cuda"
    uploads = [jpeg(photo(seed=i), orientation) for i, orientation in enumerate([1, 3, 6, 8])]
    on_gpu = [decode_image(data, SIZE, LIMIT, device=cuda) for data in uploads]
    on_cpu = [decode_image(data, SIZE, LIMIT) for data in uploads]
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu.pixels.device.type == "cuda"
        assert (gpu.width, gpu.height) == (cpu.width, cpu.height)
        assert np.abs(host(gpu.pixels) - cpu.pixels).mean() < 0.02

    backend = TorchBackend(model, cuda, half=half)
    from_gpu = backend.forward(torch.stack([d.pixels for d in on_gpu]))  # (N, 3, H, W) on CUDA
    cpu_batch = torch.from_numpy(np.stack([d.pixels for d in on_cpu]))
    from_host = torch.from_numpy(backend.forward(cpu_batch))  # through pinned memory
    with torch.no_grad():
        expected = model(cpu_batch)
    scale = expected.abs().max().item()
    tol = 1e-2  # fp16, or TF32 convolutions (cuDNN's default) in fp32
    torch.testing.assert_close(from_host, expected, rtol=tol, atol=tol * scale)
    assert (torch.from_numpy(from_gpu) - expected).abs().mean() < 0.05 * scale

    with pytest.raises(CorruptImage):
        decode_image(uploads[0][: len(uploads[0]) // 2], SIZE, LIMIT, device=cuda)
