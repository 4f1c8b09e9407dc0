import pytest
import torch

from model import ARCHITECTURES, build_model, fold_batchnorm, prepare_for_inference
from model.config import DARKNET24
from model.network import CNNBlock


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_seed_config_has_24_convs_and_its_comma_fixed():
    convs = sum(1 for x in DARKNET24 if isinstance(x, tuple))
    convs += sum(2 * x[2] for x in DARKNET24 if isinstance(x, list))
    assert convs == 24
    assert DARKNET24[1] == "M" and DARKNET24[2] == (3, 192, 1, 1)


@pytest.mark.parametrize(
    ("arch", "image_size", "S", "C", "B"),
    [
        ("yolov1", 448, 7, 20, 2),
        ("yolov1-paper", 448, 7, 20, 2),
        ("yolov1-tiny", 448, 7, 20, 2),
        ("yolov1-tiny", 192, 3, 1, 3),
    ],
)
def test_output_shape(arch, image_size, S, C, B):
    model = build_model(arch, num_classes=C, boxes_per_cell=B, image_size=image_size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, image_size, image_size))
    assert out.shape == (2, S, S, C + 5 * B)
    assert model.grid_size == S


def expected_params(arch: str, S: int = 7, B: int = 2, C: int = 20) -> int:
    """Count by hand from the layer list: conv k*k*cin*cout + BN 2*cout, then the two Linears."""
    cfg = ARCHITECTURES[arch]
    total, cin = 0, 3
    layers = []
    for x in cfg.layers:
        if isinstance(x, tuple):
            layers.append(x)
        elif isinstance(x, list):
            layers += list(x[:-1]) * x[-1]
    for k, cout, _, _ in layers:
        total += k * k * cin * cout + 2 * cout
        cin = cout
    hidden = cfg.head_hidden
    return total + (cin * S * S + 1) * hidden + (hidden + 1) * S * S * (C + 5 * B)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_parameter_count(arch):
    assert count_params(build_model(arch)) == expected_params(arch)


def test_seed_architecture_has_85_79_million_parameters():
    assert round(count_params(build_model("yolov1")) / 1e6, 2) == 85.79


def test_cnn_block_is_conv_without_bias_bn_leaky_relu():
    block = next(m for m in build_model("yolov1-tiny").modules() if isinstance(m, CNNBlock))
    assert block.conv.bias is None
    assert isinstance(block.batchnorm, torch.nn.BatchNorm2d)
    assert block.leakyrelu.negative_slope == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [0, 100, -64])
def test_image_size_must_divide_by_64(bad):
    with pytest.raises(ValueError, match="image_size"):
        build_model("yolov1-tiny", image_size=bad)


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError, match="yolov1-tiny"):
        build_model("yolov3")


@pytest.mark.parametrize("seed", [0, 1])
def test_batchnorm_folding_is_equivalent(seed):
    torch.manual_seed(seed)
    model = build_model("yolov1-tiny", image_size=128)
    # Give BatchNorm non-trivial statistics, as after training.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    images = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        reference = model(images)
        folded = fold_batchnorm(model)
        ready = prepare_for_inference(model)
        out_folded = folded(images)
        out_ready = ready(images.contiguous(memory_format=torch.channels_last))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    scale = reference.abs().max()
    torch.testing.assert_close(out_folded / scale, reference / scale, rtol=0, atol=1e-4)
    torch.testing.assert_close(out_ready / scale, reference / scale, rtol=0, atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()), "original untouched"


def test_half_precision_refused_on_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        prepare_for_inference(build_model("yolov1-tiny", image_size=64), "cpu", torch.float16)
