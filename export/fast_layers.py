"""Equivalent forms of the generator's layers that onnxruntime's CPU kernels run faster.

The export writes these in place of the trained layers; :mod:`digitgen.export.verify` still checks
the file against the trained model itself. On an Intel Xeon (one thread, batch 8) they take the
generator from about 350 to 250 microseconds a digit:

- onnxruntime runs a ``ConvTranspose`` one image at a time and scatters its result (col2im); the
  same layer as four small convolutions, one per output-pixel phase, runs in its blocked (NCHWc)
  convolution kernels, and two ``Concat`` interleave the phases (``DepthToSpace`` was slower);
- a convolution with one output channel wastes all but one lane of those blocked kernels; a
  depthwise convolution and a sum over channels computes it without the waste. The sum is a tree of
  additions, not a ``ReduceSum``: on AVX2 CPUs onnxruntime's ``ReduceSum`` adds the channels of a batch
  of one in another order than those of a larger batch, so a digit's pixels would depend on the batch
  it was made in; an addition of two tensors gives each pixel the same sum whatever the batch.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# (row phase a, column phase b) of the output pixel (2i + a, 2j + b), in the order concatenated
PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


class PhaseConvTranspose2d(nn.Module):
    """``ConvTranspose2d(kernel 4, stride 2, padding 1)`` as four 2x2 convolutions and an interleave.

    Output pixel (2i + a, 2j + b) sums input rows i - 1 + a, i + a with kernel rows 3 - a, 1 - a,
    and the same for columns; each phase is a 2x2 convolution over the input padded on one side.
    """

    def __init__(self, layer: nn.ConvTranspose2d) -> None:
        super().__init__()
        weight = layer.weight.detach()  # (in, out, 4, 4)
        # one (out, in, 2, 2) tensor per phase, so that each becomes its convolution's own initializer
        # (which int8 quantization needs) rather than a slice of one
        self.weights = nn.ParameterList(
            nn.Parameter(weight[:, :, [3 - a, 1 - a]][:, :, :, [3 - b, 1 - b]].transpose(0, 1).contiguous())
            for a, b in PHASES
        )
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        """Whether ``layer`` is a transposed convolution this class computes exactly."""
        return (
            type(layer) is nn.ConvTranspose2d
            and layer.kernel_size == (4, 4)
            and layer.stride == (2, 2)
            and layer.padding == (1, 1)
            and layer.output_padding == (0, 0)
            and layer.dilation == (1, 1)
            and layer.groups == 1
            and layer.padding_mode == "zeros"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, height, width = self.weights[0].shape[0], x.shape[2], x.shape[3]
        phases = [
            F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), weight, self.bias)
            for weight, (a, b) in zip(self.weights, PHASES, strict=True)
        ]  # each (B, out, H, W)
        rows = [
            torch.stack(phases[2 * a : 2 * a + 2], dim=-1).reshape(-1, channels, height, 2 * width) for a in (0, 1)
        ]  # each (B, out, H, 2W): columns interleaved
        return torch.stack(rows, dim=3).reshape(-1, channels, 2 * height, 2 * width)


class ChannelSumConv2d(nn.Module):
    """A stride-1, same-size ``Conv2d`` with one output channel as a depthwise convolution and a channel sum."""

    def __init__(self, layer: nn.Conv2d) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().transpose(0, 1).contiguous())  # (in, 1, k, k)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.padding = layer.padding

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        """Whether ``layer`` is a convolution this class computes exactly."""
        return (
            type(layer) is nn.Conv2d
            and layer.out_channels == 1
            and layer.groups == 1
            and layer.stride == (1, 1)
            and layer.dilation == (1, 1)
            and layer.padding == tuple(k // 2 for k in layer.kernel_size)
            and all(k % 2 == 1 for k in layer.kernel_size)
            and layer.padding_mode == "zeros"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_channel = F.conv2d(x, self.weight, padding=self.padding, groups=self.weight.shape[0])
        total = channel_sum(per_channel)
        return total if self.bias is None else total + self.bias


def channel_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(dim=1, keepdim=True)`` by pairwise additions of halves (an odd channel out is carried to the
    next level), so that each sample's sum does not depend on the batch around it."""
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        pairs = x[:, :half] + x[:, half : 2 * half]
        x = torch.cat([pairs, x[:, 2 * half :]], dim=1) if x.shape[1] % 2 else pairs
    return x


def with_fast_layers(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every layer that has a faster equivalent replaced by it."""
    fast = copy.deepcopy(model).eval()
    for parent in list(fast.modules()):
        for name, child in parent.named_children():
            for replacement in (PhaseConvTranspose2d, ChannelSumConv2d):
                if replacement.fits(child):
                    setattr(parent, name, replacement(child))
    return fast
