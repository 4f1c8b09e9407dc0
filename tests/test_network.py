import pytest
import torch
import torch.nn.functional as F

from model import ARCHITECTURES, build_model, fold_batchnorm, prepare_for_inference
from model.config import DARKNET24
from model.network import CNNBlock, share_cells


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


def test_shared_cells_make_the_connected_layer_a_one_by_one_convolution():
    S, K, D = 5, 6, 30
    torch.manual_seed(0)
    linear = torch.nn.Linear(K * S * S, D * S * S)
    share_cells(linear, S)
    x = torch.randn(3, K, S, S)
    y = linear(x.flatten(1)).view(3, S, S, D)  # as YOLOv1.head flattens and views
    block, bias = linear.weight[:D, :: S * S], linear.bias[:D]  # cell (0, 0)'s outputs and inputs
    reference = F.conv2d(x, block[:, :, None, None], bias).permute(0, 2, 3, 1)
    torch.testing.assert_close(y, reference)
    # A convolution commutes with shifting the map: an object moved by a cell moves its output.
    shifted = linear(torch.roll(x, (1, 2), (2, 3)).flatten(1)).view(3, S, S, D)
    torch.testing.assert_close(shifted, torch.roll(y, (1, 2), (1, 2)))
    # Sharing again is the identity; a fresh block is initialised for one cell's K inputs.
    before = linear.weight.clone()
    share_cells(linear, S)
    torch.testing.assert_close(linear.weight, before)
    share_cells(linear, S, fresh=True)
    assert linear.weight.abs().max() <= 1 / K**0.5
    assert linear.weight[:D, 0].abs().max() > 1 / (K * S * S) ** 0.5  # not the S*S*K fan-in


def test_shared_cells_average_the_cells_blocks():
    S, K, D = 2, 1, 1
    linear = torch.nn.Linear(K * S * S, D * S * S)
    with torch.no_grad():
        linear.weight.copy_(torch.arange(16.0).view(4, 4))  # the diagonal: 0, 5, 10, 15
        linear.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    share_cells(linear, S)
    torch.testing.assert_close(linear.weight, torch.eye(4) * 7.5)  # (0 + 5 + 10 + 15) / 4
    torch.testing.assert_close(linear.bias, torch.full((4,), 3.0))
