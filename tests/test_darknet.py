"""The Darknet reader and the YOLOv1 import, against an independent NumPy Darknet and real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.boxes import decode_predictions
from model.checkpoint import load_checkpoint, read_metadata
from model.darknet import (
    DarknetError,
    DarknetNetwork,
    MaxPool,
    Section,
    detect_yolo,
    load_darknet,
    parse_cfg,
    read_cfg,
)
from model.import_darknet import cli, detection_permutation, import_darknet
from tests import darknet_reference as ref

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEACHERS = SHARED / "teachers"
needs_teachers = pytest.mark.skipif(
    not TEACHERS.is_dir(), reason=f"the pretrained Darknet detectors are not at {TEACHERS}"
)

# A reduced yolov1.cfg: the same layer types (7x7/2 conv, 1x1 convs with pad=1, one without
# batch norm, max-pools, [local], dropout, connected, detection with num=3), fewer filters.
YOLOV1_SMALL = """
[net]
batch=64
width=224
height=224
channels=3
momentum=0.9

[convolutional]
batch_normalize=1
filters=8
size=7
stride=2
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=8
size=1
stride=1
pad=1
activation=linear

[convolutional]
batch_normalize=1
filters=16
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
batch_normalize=1
size=3
stride=2
pad=1
filters=16
activation=leaky

[local]
size=3
stride=1
pad=1
filters=8
activation=leaky

[dropout]
probability=.5

[connected]
output=1715
activation=linear

[detection]
classes=20
coords=4
rescore=1
side=7
num=3
softmax=0
sqrt=1
jitter=.2
"""

# A reduced yolov1-tiny.cfg: convs and max-pools, then straight to the connected layer, num=2.
TINY_SMALL = "\n".join(
    ["[net]", "width=112", "height=112", "channels=3"]
    + sum(
        (
            [f"[convolutional]\nbatch_normalize=1\nfilters={f}\nsize=3\nstride=1\npad=1\n"
             "activation=leaky", "[maxpool]\nsize=2\nstride=2"]
            for f in (8, 16, 16, 16)
        ),
        [],
    )
    + [
        "[convolutional]\nbatch_normalize=1\nfilters=16\nsize=3\nstride=1\npad=1\nactivation=leaky",
        "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=1\npad=1\nactivation=leaky",
        "[connected]\noutput=1470\nactivation=linear",
        "[detection]\nclasses=20\ncoords=4\nrescore=1\nside=7\nnum=2\nsoftmax=0\nsqrt=1",
    ]
)  # fmt: skip

HEADERS = {"seen-64bit": (0, 2), "seen-32bit": (0, 1), "transposed": (1001, 0)}


def make_files(tmp_path: Path, cfg_text: str, header: tuple[int, int], seed: int = 0):
    cfg = tmp_path / "model.cfg"
    cfg.write_text(cfg_text)
    _, layers = ref.read_cfg(cfg_text)
    ref.random_weights(layers, np.random.default_rng(seed))
    weights = tmp_path / "model.weights"
    ref.write_weights(weights, layers, *header)
    return cfg, weights, layers


def darknet_grid_index(S: int, B: int, C: int) -> np.ndarray:
    """For each value of our (S, S, C+5B) grid, its index in Darknet's detection output,
    written out from ``get_detection_detections`` (independently of the importer)."""
    index = np.zeros((S, S, C + 5 * B), dtype=np.int64)
    for row in range(S):
        for col in range(S):
            i = row * S + col
            index[row, col, :C] = i * C + np.arange(C)
            for n in range(B):
                index[row, col, C + 5 * n] = S * S * C + i * B + n
                box = S * S * (C + B) + (i * B + n) * 4
                index[row, col, C + 5 * n + 1 : C + 5 * n + 5] = box + np.arange(4)
    return index


def assert_close_rel(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-4) -> None:
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("header", list(HEADERS.values()), ids=list(HEADERS))
@pytest.mark.parametrize("cfg_text,B", [(YOLOV1_SMALL, 3), (TINY_SMALL, 2)], ids=["yolov1", "tiny"])
def test_import_matches_the_numpy_darknet(tmp_path, cfg_text, B, header):
    cfg, weights, layers = make_files(tmp_path, cfg_text, header)
    out = tmp_path / "imported.safetensors"
    summary = import_darknet(cfg, weights, out)
    assert (summary["S"], summary["B"], summary["C"]) == (7, B, 20)
    model, meta = load_checkpoint(out)
    assert meta["boxes_per_cell"] == B and meta["input"]["mean"] == [0.0, 0.0, 0.0]

    size = layers[0].in_shape[1]
    image = np.random.default_rng(1).uniform(0, 1, (3, size, size))
    expected = ref.forward(layers, image)  # Darknet's flat output
    with torch.no_grad():
        grid = model(torch.from_numpy(image).float()[None])  # (1, S, S, C+5B)
    assert_close_rel(grid[0].numpy(), expected[darknet_grid_index(7, B, 20)])

    # Boxes after decoding: ours (cell, box order) against get_detection_detections.
    ref_boxes, ref_probs = ref.detection_boxes(layers[-1], expected)
    boxes, conf = decode_predictions(grid, B, 20)  # (1, S, S, B, 4), (1, S, S, B)
    assert_close_rel(boxes.reshape(-1, 4).numpy(), ref_boxes)
    probs = conf.reshape(-1, 1) * grid[0, :, :, :20].reshape(49, 1, 20).expand(49, B, 20).reshape(
        -1, 20
    )
    assert_close_rel(probs.numpy(), ref_probs)


def test_permutation_is_a_bijection():
    perm = detection_permutation(7, 3, 20)
    assert sorted(perm.tolist()) == list(range(7 * 7 * 35))


def test_darknet_network_matches_the_reference_layer_by_layer(tmp_path):
    cfg, weights, layers = make_files(tmp_path, YOLOV1_SMALL, (0, 2), seed=3)
    net = load_darknet(cfg, weights)
    image = np.random.default_rng(2).uniform(0, 1, (3, 224, 224))
    with torch.no_grad():
        (out,) = net(torch.from_numpy(image).float()[None])
    assert_close_rel(out[0].numpy(), ref.forward(layers, image))


@pytest.mark.parametrize(
    "size,stride,padding,side", [(2, 2, None, 7), (3, 1, None, 6), (2, 1, None, 5), (3, 2, 0, 9)]
)
def test_maxpool_follows_darknet_padding(size, stride, padding, side):
    opts = {"size": size, "stride": stride} | ({} if padding is None else {"padding": padding})
    pool = MaxPool(Section.of("maxpool", **opts))
    layer = ref.RefLayer("maxpool", {k: str(v) for k, v in opts.items()}, in_shape=(2, side, side))
    pad = padding if padding is not None else size - 1
    out_side = (side + pad - size) // stride + 1
    layer.out_shape = (2, out_side, out_side)
    x = np.random.default_rng(0).normal(size=(2, side, side))
    got = pool(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(got, ref.forward([layer], x).reshape(2, out_side, out_side))


@pytest.mark.parametrize("cut,problem", [(-8, "too short"), (4, "too long")])
def test_wrong_length_is_refused_and_nothing_is_written(tmp_path, capsys, cut, problem):
    cfg, weights, _ = make_files(tmp_path, TINY_SMALL, (0, 2))
    data = weights.read_bytes()
    weights.write_bytes(data[:cut] if cut < 0 else data + b"\0" * cut)
    out = tmp_path / "out.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        cli(["--cfg", str(cfg), "--weights", str(weights), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and problem in err and str(weights) in err
    assert "Traceback" not in err
    if problem == "too short":
        assert "[connected]" in err and "floats" in err  # the layer and the counts
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_import_cli_prints_a_summary(tmp_path, capsys):
    cfg, weights, _ = make_files(tmp_path, YOLOV1_SMALL, (0, 2))
    out = tmp_path / "w.safetensors"
    cli(["--cfg", str(cfg), "--weights", str(weights), "--out", str(out)])
    printed = capsys.readouterr().out
    for key in ("layers", "parameters", "S", "B", "C", "input_size", "weights_sha256"):
        assert key in printed
    source = read_metadata(out)["source"]
    assert source["cfg"] == "model.cfg" and len(source["weights_sha256"]) == 64


def test_imported_checkpoint_exports_to_onnx_within_1e4(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from model.export import export_onnx

    cfg, weights, _ = make_files(tmp_path, YOLOV1_SMALL, (0, 2))
    out = tmp_path / "w.safetensors"
    import_darknet(cfg, weights, out)
    model, _ = load_checkpoint(out)
    onnx_path = export_onnx(model, tmp_path / "w.onnx")
    images = torch.rand(2, 3, 224, 224)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (grid,) = session.run(["grid"], {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images).numpy()
    assert_close_rel(grid, expected)


@pytest.mark.parametrize(
    "text,message",
    [
        ("[net]\nwidth=8\nheight=8\n[fancy]\n", "<cfg>:4: unknown section [fancy]"),
        ("[net]\nwidth=8\nheight=8\n[convolutional]\nactivation=mish\n",
         "<cfg>:4 [convolutional]: activation='mish'"),
        ("width=8\n[net]\n", "<cfg>:1: option"),
        ("[net]\nwidth=8\nheight=8\n[convolutional]\nfilters=x\n", "filters='x' is not an integer"),
    ],
)  # fmt: skip
def test_cfg_errors_name_the_section_and_line(text, message):
    with pytest.raises(DarknetError) as info:
        DarknetNetwork(parse_cfg(text))
    assert message in str(info.value)


def test_yolov1_import_refuses_a_non_yolov1_cfg(tmp_path):
    text = "[net]\nwidth=32\nheight=32\n[convolutional]\nfilters=75\nsize=1\nactivation=linear\n"
    text += "[yolo]\nmask=0,1,2\nanchors=1,1,2,2,3,3\nclasses=20\nnum=3\n"
    cfg = tmp_path / "y.cfg"
    cfg.write_text(text)
    _, layers = ref.read_cfg(text.replace("[yolo]", "[dropout]"))
    ref.random_weights(layers, np.random.default_rng(0))
    weights = tmp_path / "y.weights"
    ref.write_weights(weights, layers, 0, 2)
    with pytest.raises(DarknetError, match="ends with a \\[detection\\] layer"):
        import_darknet(cfg, weights, tmp_path / "o.safetensors")


# -- real Darknet files --------------------------------------------------------------------------

TEACHER_FILES = {
    "yolo-fastest-xl": ("yolo-fastest-xl-voc/yolo-fastest-xl.cfg",
                        "yolo-fastest-xl-voc/yolo-fastest-xl.weights"),
    "yolo-fastest": ("yolo-fastest-voc/yolo-fastest.cfg",
                     "yolo-fastest-voc/yolo-fastest.weights"),
    "mobilenetv2-nano": ("mobilenetv2-yolov3-nano-voc/MobileNetV2-YOLOv3-Nano-voc.cfg",
                         "mobilenetv2-yolov3-nano-voc/MobileNetV2-YOLOv3-Nano-voc.weights"),
}  # fmt: skip


@pytest.mark.shared
@needs_teachers
@pytest.mark.parametrize("name", list(TEACHER_FILES))
def test_real_darknet_files_are_read_to_the_last_byte(name):
    cfg, weights = (TEACHERS / f for f in TEACHER_FILES[name])
    net = DarknetNetwork(read_cfg(cfg))
    reader = net.load_weights(weights)  # raises unless every float is consumed
    assert reader.offset == reader.values.numel() > 0
    assert (reader.major, reader.minor) >= (0, 2)


def load_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255)[None]


@pytest.mark.shared
@needs_teachers
def test_yolo_fastest_xl_finds_the_dog_and_the_bird():
    from torchvision.ops import box_iou

    from model.config import VOC_CLASSES

    cfg, weights = (TEACHERS / f for f in TEACHER_FILES["yolo-fastest-xl"])
    net = load_darknet(cfg, weights)
    dog = detect_yolo(net, load_image(SHARED / "images" / "dog.jpg", 320), 0.3)[0]
    names = [VOC_CLASSES[i] for i in dog["labels"].tolist()]
    assert {"dog", "bicycle", "car"} <= set(names)
    k = names.index("dog")
    assert dog["scores"][k] > 0.5
    # Where Darknet's demo draws the dog in the 768x576 dog.jpg: about (124, 223)-(324, 537).
    truth = torch.tensor([[124 / 768, 223 / 576, 324 / 768, 537 / 576]])
    assert box_iou(dog["boxes"][k : k + 1], truth).item() > 0.6
    eagle = detect_yolo(net, load_image(SHARED / "images" / "eagle.jpg", 320), 0.3)[0]
    assert VOC_CLASSES[eagle["labels"][0]] == "bird" and eagle["scores"][0] > 0.5


@pytest.mark.slow
@pytest.mark.anyio
async def test_service_serves_an_imported_checkpoint_on_onnxruntime(tmp_path, serve):
    """End to end: import, serve on ONNX Runtime, and answer as the model does in process."""
    import io

    from PIL import Image

    from app.inference import decode_image
    from model.export import ensure_onnx
    from model.postprocess import postprocess

    cfg, weights, layers = make_files(tmp_path, YOLOV1_SMALL, (0, 2))
    for key in ("weights", "biases"):  # outputs mostly inside (-1, 1): few tied scores of 1
        layers[-2].params[key] *= 0.3
    ref.write_weights(weights, layers, 0, 2)
    out = tmp_path / "yolov1-darknet.safetensors"
    import_darknet(cfg, weights, out)
    pixels = np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")  # lossless and already 224 px: no resize
    data = buffer.getvalue()

    ensure_onnx(out)  # exported before startup, whose timeout a busy machine could overrun
    model, _ = load_checkpoint(out)
    image = torch.from_numpy(decode_image(data, 224, 10**8).pixels)[None]
    with torch.no_grad():
        (expected,) = postprocess(model(image), 3, 20, 0.05, 0.5, max_detections=100)

    async with serve(weights=out, backend="onnxruntime") as (client, _):
        info = (await client.get("/v1/model")).json()
        assert info["boxes_per_cell"] == 3 and info["grid_size"] == 7
        assert info["source"]["cfg"] == "model.cfg"
        assert info["source"]["weights_sha256"] == read_metadata(out)["source"]["weights_sha256"]
        r = await client.post(
            "/v1/detect",
            files={"image": ("x.png", data, "image/png")},
            params={"confidence": 0.05, "max_detections": 100},
        )
    assert r.status_code == 200, r.text
    found = r.json()["detections"]
    assert len(found) == len(expected["scores"]) > 0
    got = sorted(
        (round(d["confidence"], 3), d["class_id"], *(d["box"][k] for k in ("x1", "y1", "x2", "y2")))
        for d in found
    )
    want = sorted(
        (round(s, 3), c, *(b * 224).tolist())
        for s, c, b in zip(
            expected["scores"].tolist(), expected["labels"].tolist(), expected["boxes"], strict=True
        )
    )
    np.testing.assert_allclose(np.array(got), np.array(want), atol=0.05)
