"""INT8 for the CPU: a static QDQ quantization of an ONNX export, calibrated on training images.

The int8 engine is ``model.export``'s float graph with its network part (every node the
``grid`` output depends on) quantized by ``onnxruntime.quantization.quantize_static``: QDQ
format, per-channel symmetric int8 weights, uint8 activations whose ranges come from
calibration images decoded and resized by the service's own ``app.inference.decode_image``
(see ``app.calibration``, which reads them and calls ``quantize_onnx``).
Box decoding and the scores read the dequantized grid and stay float, and so does NMS. ONNX
Runtime fuses each ``DequantizeLinear -> Conv -> QuantizeLinear`` into an integer kernel.

The file is cached beside the float export (``<stem>.<sha256[:16]>.v<N>.int8-<key>.onnx``),
keyed by the weights' content and the calibration settings, and written by a child process
(``python -m app.calibration WEIGHTS OUT --data ROOT``) as the float export is. Nothing here
imports torch, the service, or onnxruntime's quantization tools at module level.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from model.export import EXPORT_VERSION, PROJECT_ROOT, cached_file, run_module
from model.files import image_files
from model.metadata import file_sha256

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

# Part of the cache key: bump it whenever the quantization recipe changes.
QUANTIZE_VERSION = 1

Precision = Literal["fp32", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "int8")
Quantizer = Callable[[Path, Path, Sequence[Path], "QuantizeSettings"], Path]


@dataclass(frozen=True)
class QuantizeSettings:
    """How the int8 engine is calibrated; every field is part of its cache key."""

    images: int = 32  # calibration images, spread evenly over the split (the probe)
    split: str = "train"  # of a VOC root; a plain folder gives all its images
    method: Literal["minmax", "percentile", "entropy"] = "minmax"
    # 7-bit weights. On AVX2 without VNNI, ONNX Runtime's u8 x s8 kernels add pairs of
    # products in int16 (vpmaddubsw), which saturates past 32767: 255 * 127 * 2 does, 255 * 63 * 2
    # does not. VNNI sums in int32 and needs no reduced range; the engine may run on either.
    reduce_range: bool = True
    # Cross-layer equalization first (see equalize_convolutions): float output unchanged, and
    # per-tensor activation ranges no longer set by a few wide channels (depthwise convs).
    equalize: bool = True

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ValueError(f"calibration images must be >= 1, got {self.images}")
        if self.method not in ("minmax", "percentile", "entropy"):
            raise ValueError(f"method must be minmax, percentile or entropy, got {self.method!r}")

    def key(self, data: Sequence[Path]) -> str:
        """12 hex digits naming these settings and the calibration folders (by their names)."""
        fields = {**asdict(self), "data": [Path(d).name for d in data], "v": QUANTIZE_VERSION}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


# ---- calibration images ---------------------------------------------------------------------


def calibration_files(roots: Sequence[str | Path], split: str, count: int) -> list[Path]:
    """Up to ``count`` image files, spread evenly (by sorted path) over every root.

    A root in Pascal VOC layout gives the images of ``ImageSets/Main/<split>.txt``; any other
    folder gives every image file below it. Raises ``ValueError`` naming a root that is
    missing or holds no image file.
    """
    if not roots:
        raise ValueError("no calibration folder given")
    files: list[Path] = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise ValueError(f"calibration folder {root} does not exist")
        found = image_files(root, split)
        if not found:
            raise ValueError(f"calibration folder {root} holds no image file ({split} split)")
        files.extend(found)
    files.sort()
    if len(files) <= count:
        return files
    picks = np.linspace(0, len(files) - 1, count).round().astype(int)
    return [files[i] for i in picks]


# ---- quantization ---------------------------------------------------------------------------

# Between two convolutions these commute with a positive per-channel scale: f(s * x) = s * f(x).
_POSITIVE_HOMOGENEOUS = ("Relu", "LeakyRelu", "MaxPool")


def equalize_convolutions(model: onnx.ModelProto, iterations: int = 4) -> int:
    """Cross-layer equalization (Nagel et al., "Data-Free Quantization", ICCV 2019), in place.

    For each pair ``Conv1 -> [Relu | LeakyRelu | MaxPool]* -> Conv2`` whose intermediate
    tensors have no other reader, output channel i of Conv1 (weights and bias) is divided by
    ``s_i`` and input channel i of Conv2 multiplied by it, with ``s_i = sqrt(r1_i / r2_i)``
    (``r``: the channel's largest absolute weight), so that both ranges become
    ``sqrt(r1_i * r2_i)``. The float function is unchanged; what changes is that no channel's
    weights or activations are far wider than its neighbours', which per-tensor activation
    scales (and the 8 bits they share) cannot serve. Conv2 may be dense or depthwise (one
    filter per channel). Returns the number of pairs.
    """
    from onnx import numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {out.name for out in model.graph.output}

    def only_reader(tensor: str) -> onnx.NodeProto | None:
        found = readers.get(tensor, [])
        return found[0] if len(found) == 1 and tensor not in graph_outputs else None

    def group(node: onnx.NodeProto) -> int:
        return next((a.i for a in node.attribute if a.name == "group"), 1)

    def owned(node: onnx.NodeProto, index: int) -> bool:  # an initializer this node alone reads
        name = node.input[index] if len(node.input) > index else ""
        return name in weights and len(readers.get(name, [])) == 1

    pairs = []
    for first in model.graph.node:
        if first.op_type != "Conv" or not owned(first, 1) or len(weights[first.input[1]].dims) != 4:
            continue
        second = only_reader(first.output[0])
        while second is not None and second.op_type in _POSITIVE_HOMOGENEOUS:
            second = only_reader(second.output[0])
        if second is None or second.op_type != "Conv" or not owned(second, 1):
            continue
        if len(weights[second.input[1]].dims) != 4:  # 2-D convolutions only
            continue
        w2_shape = weights[second.input[1]].dims  # (C_out, C_in / group, k, k)
        depthwise = group(second) > 1
        if depthwise and not (group(second) == w2_shape[0] and w2_shape[1] == 1):
            continue  # grouped with several channels per group: channels do not map one to one
        pairs.append((first, second, depthwise))

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(weights[name]).astype(np.float32)

    def store(name: str, value: np.ndarray) -> None:
        weights[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    for _ in range(iterations):  # each pair's scales move its neighbours' ranges: repeat
        for first, second, depthwise in pairs:
            w1, w2 = array(first.input[1]), array(second.input[1])
            r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)  # (C,)
            per_input = w2 if depthwise else w2.swapaxes(0, 1)  # (C, ...)
            r2 = np.abs(per_input.reshape(per_input.shape[0], -1)).max(axis=1)  # (C,)
            if r1.shape != r2.shape:
                continue
            usable = (r1 > 0) & (r2 > 0)
            scale = np.where(usable, np.sqrt(r1 / np.where(usable, r2, 1)), 1.0)  # (C,)
            store(first.input[1], w1 / scale.reshape(-1, 1, 1, 1))
            if depthwise:
                store(second.input[1], w2 * scale.reshape(-1, 1, 1, 1))
            else:
                store(second.input[1], w2 * scale.reshape(1, -1, 1, 1))
            if owned(first, 2):
                store(first.input[2], array(first.input[2]) / scale)
    return len(pairs)


def network_nodes(model: onnx.ModelProto, output: str = "grid") -> list[str]:
    """Names of the nodes ``output`` depends on: the network, not the decoding after it.

    Nodes without a name are given one (``quantize_static`` selects nodes by name).
    """
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    producer = {out: node for node in model.graph.node for out in node.output}
    if output not in producer:
        raise ValueError(f"the graph has no node producing {output!r}")
    needed: dict[str, None] = {}
    stack = [output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in needed:
            continue
        needed[node.name] = None
        stack.extend(node.input)
    return list(needed)


def quantize_onnx(
    float_path: str | Path,
    out: str | Path,
    images: Sequence[np.ndarray],
    settings: QuantizeSettings = QuantizeSettings(),
) -> Path:
    """Write the int8 QDQ engine of the export ``float_path`` to ``out``, atomically.

    ``images``: calibration inputs, (3, H, W) float32 in [0, 1] each.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from model.export import INPUT_NAME

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self._batches, None)
            return None if image is None else {INPUT_NAME: image[None]}  # (1, 3, H, W)

    out = Path(out)
    model = onnx.load(str(float_path))
    nodes = network_nodes(model)
    if settings.equalize:
        logger.info("equalized %d pairs of convolutions", equalize_convolutions(model))
    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[settings.method]
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="yolov1-int8-") as work:
        named = Path(work) / "float.onnx"  # the graph with every node named
        onnx.save(model, str(named))
        del model
        try:
            quantize_static(
                str(named),
                str(tmp),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=settings.reduce_range,
                nodes_to_quantize=nodes,
                calibrate_method=method,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
            _stamp(tmp, settings)
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
    logger.info("quantized %s to %s in %.1f s", float_path, out, time.perf_counter() - start)
    return out


def _stamp(path: Path, settings: QuantizeSettings) -> None:
    """Record the calibration settings in the file's metadata, for whoever finds it later."""
    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "yolov1_int8", json.dumps(asdict(settings))
    onnx.save(model, str(path))


# ---- the cache ------------------------------------------------------------------------------


def int8_file_name(
    weights_path: Path, settings: QuantizeSettings, data: Sequence[Path], sha256: str | None = None
) -> str:
    digest = sha256 or file_sha256(weights_path)
    return f"{weights_path.stem}.{digest[:16]}.v{EXPORT_VERSION}.int8-{settings.key(data)}.onnx"


def quantize_in_subprocess(
    weights_path: Path, out: Path, data: Sequence[Path], settings: QuantizeSettings
) -> Path:
    """Write the int8 engine of ``weights_path`` to ``out`` in a child Python, so that the
    float export and the calibration's memory never enter this process. The child is
    ``app.calibration``, named rather than imported: it decodes with the service's decoder.
    Raises ``RuntimeError`` with the child's last words."""
    command = ["app.calibration", str(weights_path), str(out)]
    command += ["--data", *map(str, data), "--images", str(settings.images)]
    command += ["--split", settings.split, "--method", settings.method]
    command += [] if settings.reduce_range else ["--no-reduce-range"]
    command += [] if settings.equalize else ["--no-equalize"]
    run_module(command, f"the int8 quantization of {weights_path}")
    return out


def ensure_int8(
    weights_path: str | Path,
    data: Sequence[str | Path],
    settings: QuantizeSettings = QuantizeSettings(),
    cache_dir: str | Path | None = None,
    *,
    replace: bool = False,
    quantizer: Quantizer = quantize_in_subprocess,
    sha256: str | None = None,
) -> Path:
    """Return the path of the int8 engine of ``weights_path``, quantizing only when none is cached.

    As ``model.export.ensure_onnx``: the file goes to ``cache_dir`` (default: beside the
    weights), else to ``<system temp dir>/yolov1-onnx``; one already in either place is reused
    unless ``replace``. ``data`` (calibration folders) is read only when quantizing, so a
    cached engine serves without them.
    """
    weights_path = Path(weights_path)
    data = [Path(d) for d in data]
    name = int8_file_name(weights_path, settings, data, sha256)
    primary = Path(cache_dir) if cache_dir is not None else weights_path.parent

    def check_data() -> None:  # needed only to quantize: a cached engine serves without it
        missing = [str(d) for d in data if not d.is_dir()]
        if not data or missing:
            raise ValueError(
                f"no int8 engine of {weights_path.name} is cached, and the calibration folder "
                f"{', '.join(missing) or '(none given)'} does not exist"
            )

    return cached_file(
        primary, name, "int8 engine", lambda path: quantizer(weights_path, path, data, settings),
        replace=replace, prepare=check_data,
    )  # fmt: skip


def training_data(metadata: dict[str, Any]) -> list[Path]:
    """The training folders a checkpoint records (``training.data``), as paths that exist
    where possible: as written (relative to the working directory), else relative to the
    project root, where ``yolov1-train`` is run from."""
    found = []
    for entry in metadata.get("training", {}).get("data", []):
        path = Path(entry)
        if not path.is_absolute() and not path.is_dir():
            path = PROJECT_ROOT / path
        found.append(path)
    return found
