"""2:4 semi-structured sparsity on CUDA through ``torch.sparse.to_sparse_semi_structured``.

PyTorch ships the GPU kernels (cuSPARSELt, or CUTLASS where cuSPARSELt is missing); this module only checks
what they need (a GPU of compute capability >= 8.0, fp16/bf16 weights, 2:4 rows, minimum shapes) and says
why a layer or the whole backend is skipped instead of failing inside a kernel.
"""

from __future__ import annotations

import logging
import statistics
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from seftkit.models import linear_weight
from seftkit.sparsity.masks import nm_valid

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere and newer
DTYPES = (torch.float16, torch.bfloat16)


def unavailable_reason() -> str | None:
    """Why the CUDA 2:4 backend cannot run here, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return f"GPU compute capability {capability[0]}.{capability[1]} < 8.0 has no 2:4 sparse tensor cores"
    return None


def _kernel_class() -> type:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return SparseSemiStructuredTensorCUSPARSELT if torch.backends.cusparselt.is_available() \
        else SparseSemiStructuredTensorCUTLASS


def weight_unfit_reason(weight: torch.Tensor) -> str | None:
    """Why this [out, in] weight cannot be 2:4 compressed, or ``None``."""
    if weight.dtype not in DTYPES:
        return f"dtype {weight.dtype} (needs float16 or bfloat16)"
    rows, cols = weight.shape
    limits = _kernel_class()._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]
    min_rows, min_cols = limits.sparse_min_rows, limits.sparse_min_cols
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        return f"shape {rows}x{cols} (needs multiples of {min_rows}x{min_cols})"
    if not nm_valid(weight, 2, 4):
        return "not 2:4 sparse"
    return None


def to_cuda24(weight: torch.Tensor) -> torch.Tensor:
    """The compressed 2:4 tensor (call :func:`weight_unfit_reason` first)."""
    torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = _kernel_class().BACKEND == "cutlass"
    return torch.sparse.to_sparse_semi_structured(weight.detach().cuda().contiguous())


def sparsify_cuda24(model: nn.Module, linears: dict[str, nn.Module]) -> nn.Module:
    """Compress every fitting linear in place; the model stays dense (with a warning) when CUDA cannot."""
    reason = unavailable_reason()
    if reason:
        warnings.warn(f"seftkit: cuda24 backend skipped: {reason}; the model stays dense", RuntimeWarning,
                      stacklevel=3)
        return model
    for name, module in linears.items():
        unfit = weight_unfit_reason(linear_weight(module))
        if unfit or type(module).__name__ == "Conv1D":
            log.info("cuda24: %s stays dense: %s", name, unfit or "Conv1D weights are stored transposed")
            continue
        module.weight = nn.Parameter(to_cuda24(module.weight), requires_grad=False)
    return model


def time_linear_ms(weight: torch.Tensor, batch: int, rounds: int, warmup: int = 3) -> tuple[float, float]:
    """(min, median) milliseconds of ``F.linear`` on the GPU, timed with CUDA events."""
    x = torch.randn(batch, weight.shape[1], dtype=torch.float16 if weight.dtype == torch.float16
                    else torch.bfloat16, device="cuda")
    for _ in range(warmup):
        F.linear(x, weight)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        F.linear(x, weight)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return min(times), statistics.median(times)
