"""Multiply-add counts of the models and the machine's fp32 GEMM rate, shared by the benchmarks."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn


def count_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-adds of one forward pass over ``inputs`` (convolutions, transposed convolutions, linear)."""
    total = 0

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.ConvTranspose2d):
            kh, kw = module.kernel_size
            total += args[0].numel() * module.out_channels * kh * kw // module.groups
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * module.in_channels * kh * kw // module.groups
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def gemm_macs_per_s(size: int = 2048, min_seconds: float = 2.0) -> float:
    """fp32 matrix-multiply rate of this machine through numpy's BLAS, in multiply-adds per second."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        a @ b
        runs += 1
    return runs * size**3 / (time.perf_counter() - start)
