"""SparseGPT (Frantar & Alistarh, 2023): prune with OBS weight updates from a layer-wise Hessian.

For a linear with inputs ``X`` the layer-wise reconstruction loss ``||WX - W'X||^2`` has Hessian
``H = 2/N sum x x^T``. Columns are processed left to right in blocks of 128: inside a block the mask is
chosen adaptively from ``w^2 / [H^-1]_jj^2`` (the OBS saliency, using weights already updated by earlier
columns), each pruned weight's error is spread over the not-yet-processed columns of its row through the
upper Cholesky factor of ``H^-1``, and the block's accumulated error is applied to the rest in one matmul.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from seftkit.errors import SeftkitError
from seftkit.sparsity.masks import nm_mask, prune_count, smallest_mask
from seftkit.sparsity.pattern import SparsityPattern

BLOCK_SIZE = 128
PERCDAMP = 0.01
_DAMP_RETRIES = 4  # each retry multiplies the dampening by 10


def input_gram(x: torch.Tensor) -> torch.Tensor:
    """Additive per-batch statistic: ``x^T x`` in float32 (``x`` is ``[tokens, in]``)."""
    x = x.float()
    return x.t() @ x


def hessian_inverse_factor(hessian: torch.Tensor, percdamp: float = PERCDAMP) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``, with ``damp = percdamp * mean(diag H)``.

    Dampening keeps the inverse well conditioned; if Cholesky still fails (rank-deficient calibration data
    in float32) the dampening grows tenfold a few times before giving up.
    """
    damp = percdamp * hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(_DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if not info:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if not info:
                return upper
        damp = damp * 10
    raise SeftkitError("SparseGPT: the calibration Hessian is singular even with strong dampening; "
                       "use more or longer calibration samples (--nsamples, --seqlen)")


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of tiny ops: on CPU, OpenMP hand-offs cost more than they save (10x slower
    with two threads on a busy machine), so run it on one thread and restore the setting afterwards."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _block_size(pattern: SparsityPattern, blocksize: int) -> int:
    """N:M groups must not straddle blocks: round the block down to a multiple of ``m``."""
    if not pattern.is_nm:
        return blocksize
    return max(pattern.m, blocksize - blocksize % pattern.m)


def _prune_block(
    block: torch.Tensor, hinv_block: torch.Tensor, pattern: SparsityPattern
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OBS over one block of columns, left to right: ``(pruned block, scaled errors, keep-mask)``.

    ``block`` is updated in place as errors propagate; the caller applies ``errors`` to the later columns.
    """
    pruned = torch.zeros_like(block)
    errors = torch.zeros_like(block)
    diag = hinv_block.diagonal()
    if pattern.is_nm:
        keep = torch.ones_like(block, dtype=torch.bool)
    else:
        saliency = block.square() / diag.square()
        keep = smallest_mask(saliency, prune_count(block.numel(), pattern.fraction))
    for i in range(block.shape[1]):
        if pattern.is_nm and i % pattern.m == 0:
            group = slice(i, i + pattern.m)
            keep[:, group] = nm_mask(block[:, group].square() / diag[group].square(), pattern.n, pattern.m)
        column = block[:, i]
        kept = column * keep[:, i]
        err = (column - kept) / diag[i]
        pruned[:, i] = kept
        errors[:, i] = err
        block[:, i:].addr_(err, hinv_block[i, i:], alpha=-1)
    return pruned, errors, keep


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    pattern: SparsityPattern,
    blocksize: int = BLOCK_SIZE,
    percdamp: float = PERCDAMP,
) -> torch.Tensor:
    """Prune an ``[out, in]`` weight in place (zeros plus OBS updates of kept weights); return the keep-mask.

    ``gram`` is the mean of ``x x^T`` over calibration tokens, so ``H = 2 * gram``. Unstructured sparsity is
    exact per block of ``blocksize`` columns; N:M is exact per group. Inputs that never fire (dead columns,
    ``H_jj = 0``) carry no information: their weights are zeroed, as in the reference implementation.
    """
    cols = weight.shape[1]
    work = weight.detach().float().clone()
    hessian = 2 * gram.to(device=work.device, dtype=torch.float32)
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    work[:, dead] = 0
    hinv = hessian_inverse_factor(hessian, percdamp)

    keep = torch.ones_like(work, dtype=torch.bool)
    step = _block_size(pattern, blocksize)
    with _one_cpu_thread(work.device):
        for i1 in range(0, cols, step):
            i2 = min(i1 + step, cols)
            pruned, errors, keep[:, i1:i2] = _prune_block(work[:, i1:i2].clone(), hinv[i1:i2, i1:i2], pattern)
            work[:, i1:i2] = pruned
            work[:, i2:].addmm_(errors, hinv[i1:i2, i2:], alpha=-1)
    weight.copy_(work.to(weight.dtype))
    return keep
