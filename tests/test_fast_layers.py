"""The export's faster layers compute what the trained layers compute, and the file holds them."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from digitgen.export.fast_layers import ChannelSumConv2d, PhaseConvTranspose2d, with_fast_layers
from digitgen.export.onnx_export import export_generator
from digitgen.training.config import GANConfig
from digitgen.training.models import Generator


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (1, 4, 6, 9), (2, 3, 1, 1)])
def test_phase_convolutions_equal_the_transposed_convolution(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(shape[1], 6, 4, stride=2, padding=1, bias=bias)
    assert PhaseConvTranspose2d.fits(layer)
    x = torch.randn(shape)
    with torch.no_grad():
        expected, got = layer(x), PhaseConvTranspose2d(layer)(x)
    assert got.shape == expected.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize(("kernel", "bias"), [(3, True), (3, False), (5, True), (1, True)])
def test_depthwise_sum_equals_the_one_channel_convolution(kernel: int, bias: bool) -> None:
    torch.manual_seed(1)
    layer = nn.Conv2d(7, 1, kernel, padding=kernel // 2, bias=bias)
    assert ChannelSumConv2d.fits(layer)
    fast = ChannelSumConv2d(layer)
    assert fast.weight.shape == (7, 1, kernel, kernel)  # depthwise: one filter per input channel
    x = torch.randn(2, 7, 9, 11)
    with torch.no_grad():
        expected, got = layer(x), fast(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize(
    "layer",
    [
        nn.ConvTranspose2d(4, 4, 4, stride=2, padding=0),
        nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1),
        nn.ConvTranspose2d(4, 4, 4, stride=1, padding=1),
        nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1, output_padding=1),
        nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1, groups=2),
        nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1, dilation=2),
    ],
)
def test_other_transposed_convolutions_are_left_alone(layer: nn.Module) -> None:
    assert not PhaseConvTranspose2d.fits(layer)
    assert with_fast_layers(nn.Sequential(layer))[0].__class__ is nn.ConvTranspose2d


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(4, 2, 3, padding=1),
        nn.Conv2d(4, 1, 3, padding=0),
        nn.Conv2d(4, 1, 3, padding=1, stride=2),
        nn.Conv2d(4, 1, 3, padding=2, dilation=2),
        nn.Conv2d(4, 1, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 1, 4, padding=2),
    ],
)
def test_other_convolutions_are_left_alone(layer: nn.Module) -> None:
    assert not ChannelSumConv2d.fits(layer)
    assert with_fast_layers(nn.Sequential(layer))[0].__class__ is nn.Conv2d


@pytest.mark.parametrize("conditional_norm", [False, True])
def test_the_generator_with_fast_layers_is_the_same_function(conditional_norm: bool) -> None:
    torch.manual_seed(2)
    generator = Generator(GANConfig(latent_dim=8, g_width=16, conditional_norm=conditional_norm)).eval()
    before = {name: p.clone() for name, p in generator.state_dict().items()}
    fast = with_fast_layers(generator)
    kinds = [type(m) for m in fast.modules()]
    assert kinds.count(PhaseConvTranspose2d) == 2 and kinds.count(ChannelSumConv2d) == 1
    assert nn.ConvTranspose2d not in kinds
    z, digits = torch.randn(10, 8), torch.arange(10)
    with torch.no_grad():
        assert torch.allclose(fast(z, digits), generator(z, digits), atol=1e-5)
    assert all(torch.equal(before[name], p) for name, p in generator.state_dict().items())  # the original untouched
    assert any(type(m) is nn.ConvTranspose2d for m in generator.modules())


def test_the_exported_file_holds_the_fast_layers(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "g.onnx"
    assert export_generator(tiny_checkpoint, out).passed  # verified against the trained layers
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "ConvTranspose" not in ops and {"Conv", "Add", "Concat"} <= ops
    assert "ReduceSum" not in ops  # its order of addition depends on the batch size (see fast_layers)
