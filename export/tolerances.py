"""What an export is held to, free of torch so that the command line shows it: each precision's tolerance against
fp32 PyTorch, and the opset the exporter writes by default."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_OPSET = 18  # the lowest the torch.export-based exporter writes
PAGE_OPSET = 26  # the newest the web page's onnxruntime-web (1.30.0, web/package.json) runs: the page refuses newer


@dataclass(frozen=True)
class Tolerance:
    """Allowed |fp32 PyTorch - onnxruntime| on pixels in [0, 1]."""

    max_abs: float  # any single pixel
    mean_abs: float  # averaged over the pixels of a batch


TOLERANCES = {
    "fp32": Tolerance(max_abs=1e-4, mean_abs=1e-5),
    "fp16": Tolerance(max_abs=2e-2, mean_abs=1e-3),
    "int8": Tolerance(max_abs=0.3, mean_abs=1e-2),
}
PRECISIONS = tuple(TOLERANCES)
ATOL = TOLERANCES["fp32"].max_abs
