"""An independent NumPy Darknet, written from Darknet's C code, for the reader's tests.

It shares nothing with ``model.darknet``: its own cfg reader, its own weights writer (the
order of ``parser.c``'s ``save_weights``), and a forward pass with Darknet's im2col + gemm
convolutions, ``normalize_cpu`` batch norm, ``forward_maxpool_layer`` loops,
``forward_local_layer`` and ``get_detection_detections``. Only the YOLOv1 layer types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class RefLayer:
    kind: str
    opts: dict[str, str]
    in_shape: tuple[int, int, int] = (0, 0, 0)  # (c, h, w)
    out_shape: tuple[int, int, int] = (0, 0, 0)
    params: dict[str, np.ndarray] = field(default_factory=dict)

    def i(self, key: str, default: int) -> int:
        return int(self.opts.get(key, default))


def read_cfg(text: str) -> tuple[dict[str, str], list[RefLayer]]:
    blocks: list[tuple[str, dict[str, str]]] = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        if line.startswith("["):
            blocks.append((line[1:-1], {}))
        else:
            key, value = line.split("=")
            blocks[-1][1][key.strip()] = value.strip()
    net = blocks[0][1]
    layers = [RefLayer(kind, opts) for kind, opts in blocks[1:]]
    c, h, w = int(net.get("channels", 3)), int(net["height"]), int(net["width"])
    for layer in layers:
        layer.in_shape = (c, h, w)
        if layer.kind == "convolutional":
            size, stride = layer.i("size", 1), layer.i("stride", 1)
            pad = size // 2 if layer.i("pad", 0) else layer.i("padding", 0)
            c, h, w = (
                layer.i("filters", 1),
                (h + 2 * pad - size) // stride + 1,
                (w + 2 * pad - size) // stride + 1,
            )
        elif layer.kind == "maxpool":
            size, stride = layer.i("size", 1), layer.i("stride", 1)
            pad = layer.i("padding", size - 1)
            h, w = (h + pad - size) // stride + 1, (w + pad - size) // stride + 1
        elif layer.kind == "local":
            size, stride, pad = layer.i("size", 1), layer.i("stride", 1), layer.i("pad", 0)
            h = (h - (1 if pad else size)) // stride + 1
            w = (w - (1 if pad else size)) // stride + 1
            c = layer.i("filters", 1)
        elif layer.kind == "connected":
            c, h, w = layer.i("output", 1), 1, 1
        elif layer.kind == "detection":
            c, h, w = c * h * w, 1, 1
        layer.out_shape = (c, h, w)
    return net, layers


def random_weights(layers: list[RefLayer], rng: np.random.Generator) -> None:
    """Fill every layer's parameters with random values of a reasonable scale."""
    for layer in layers:
        c, _, _ = layer.in_shape
        n, oh, ow = layer.out_shape
        if layer.kind == "convolutional":
            k = layer.i("size", 1)
            layer.params["biases"] = rng.normal(0, 0.1, n)
            if layer.i("batch_normalize", 0):
                layer.params["scales"] = rng.uniform(0.5, 1.5, n)
                layer.params["mean"] = rng.normal(0, 0.1, n)
                layer.params["variance"] = rng.uniform(0.5, 1.5, n)
            layer.params["weights"] = rng.normal(0, np.sqrt(2 / (c * k * k)), (n, c * k * k))
        elif layer.kind == "local":
            k = layer.i("size", 1)
            layer.params["biases"] = rng.normal(0, 0.1, n * oh * ow)
            fan = c * k * k
            layer.params["weights"] = rng.normal(0, np.sqrt(2 / fan), (oh * ow, n, fan))
        elif layer.kind == "connected":
            inputs = int(np.prod(layer.in_shape))
            layer.params["biases"] = rng.normal(0, 0.1, n)
            layer.params["weights"] = rng.normal(0, np.sqrt(1 / inputs), (n, inputs))
        for key in layer.params:
            layer.params[key] = layer.params[key].astype(np.float32)


def write_weights(path: Path, layers: list[RefLayer], major: int, minor: int, seen: int = 12345):
    """``save_weights``: header, then per layer the values in ``load_*_weights`` order."""
    wide = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    chunks = [np.array([major, minor, 0], dtype="<i4").tobytes()]
    chunks.append(np.array([seen], dtype="<i8" if wide else "<i4").tobytes())
    transpose = major > 1000 or minor > 1000
    for layer in layers:
        p = layer.params
        order = {
            "convolutional": ["biases", "scales", "mean", "variance", "weights"],
            "local": ["biases", "weights"],
            "connected": ["biases", "weights"],
        }.get(layer.kind, [])
        for key in order:
            if key in p:
                value = (
                    p[key].T
                    if (key == "weights" and transpose and layer.kind == "connected")
                    else p[key]
                )
                chunks.append(np.ascontiguousarray(value, dtype="<f4").tobytes())
    path.write_bytes(b"".join(chunks))


def im2col(x: np.ndarray, size: int, stride: int, pad: int) -> np.ndarray:
    """Darknet's ``im2col_cpu``: rows (channel, ky, kx), columns the output locations."""
    c, h, w = x.shape
    oh, ow = (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1
    padded = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=np.float64)
    padded[:, pad : pad + h, pad : pad + w] = x
    cols = np.empty((c * size * size, oh * ow))
    for ch in range(c):
        for ky in range(size):
            for kx in range(size):
                patch = padded[ch, ky : ky + stride * oh : stride, kx : kx + stride * ow : stride]
                cols[(ch * size + ky) * size + kx] = patch.reshape(-1)
    return cols


def activate(x: np.ndarray, name: str) -> np.ndarray:
    if name == "leaky":
        return np.where(x > 0, x, 0.1 * x)
    if name == "relu":
        return np.maximum(x, 0)
    if name == "linear":
        return x
    if name == "logistic":
        return 1 / (1 + np.exp(-x))
    raise ValueError(name)


def forward(layers: list[RefLayer], image: np.ndarray) -> np.ndarray:
    """One image (c, h, w) float64 -> the last layer's output, flattened as Darknet stores it."""
    x = image.astype(np.float64)
    for layer in layers:
        p = layer.params
        n, oh, ow = layer.out_shape
        if layer.kind == "convolutional":
            size, stride = layer.i("size", 1), layer.i("stride", 1)
            pad = size // 2 if layer.i("pad", 0) else layer.i("padding", 0)
            out = p["weights"].astype(np.float64) @ im2col(x, size, stride, pad)  # (n, L)
            if layer.i("batch_normalize", 0):
                mean, var = p["mean"][:, None], p["variance"][:, None]
                out = (out - mean) / (np.sqrt(var) + 0.000001) * p["scales"][:, None]
            out = out + p["biases"][:, None]
            x = activate(out, layer.opts.get("activation", "logistic")).reshape(n, oh, ow)
        elif layer.kind == "maxpool":
            size, stride = layer.i("size", 1), layer.i("stride", 1)
            offset = -(layer.i("padding", size - 1) // 2)
            c, h, w = x.shape
            out = np.full((c, oh, ow), -np.inf)
            for i in range(oh):
                for j in range(ow):
                    for ky in range(size):
                        for kx in range(size):
                            yy, xx = offset + i * stride + ky, offset + j * stride + kx
                            if 0 <= yy < h and 0 <= xx < w:
                                out[:, i, j] = np.maximum(out[:, i, j], x[:, yy, xx])
            x = out
        elif layer.kind == "local":
            size, stride, pad = layer.i("size", 1), layer.i("stride", 1), layer.i("pad", 0)
            cols = im2col(x, size, stride, pad)  # (c*size*size, L)
            out = p["biases"].astype(np.float64).reshape(n, oh * ow).copy()
            for j in range(oh * ow):
                out[:, j] += p["weights"][j].astype(np.float64) @ cols[:, j]
            x = activate(out, layer.opts.get("activation", "logistic")).reshape(n, oh, ow)
        elif layer.kind == "connected":
            out = p["weights"].astype(np.float64) @ x.reshape(-1) + p["biases"]
            x = activate(out, layer.opts.get("activation", "logistic")).reshape(n, 1, 1)
        elif layer.kind in ("dropout", "detection"):
            pass
        else:
            raise ValueError(layer.kind)
    return x.reshape(-1)


def detection_boxes(layer: RefLayer, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_detection_detections`` with w = h = 1: boxes (S*S*B, 4) as xyxy and the class
    probabilities (S*S*B, C) ``conf * class``, in Darknet's (cell, box) order."""
    side, num, classes = layer.i("side", 7), layer.i("num", 1), layer.i("classes", 1)
    sqrt = layer.i("sqrt", 0)
    boxes, probs = [], []
    for i in range(side * side):
        row, col = i // side, i % side
        for n in range(num):
            scale = out[side * side * classes + i * num + n]
            b = side * side * (classes + num) + (i * num + n) * 4
            x, y = (out[b] + col) / side, (out[b + 1] + row) / side
            w, h = out[b + 2] ** (2 if sqrt else 1), out[b + 3] ** (2 if sqrt else 1)
            boxes.append([x - w / 2, y - h / 2, x + w / 2, y + h / 2])
            probs.append([scale * out[i * classes + j] for j in range(classes)])
    return np.array(boxes), np.array(probs)
