"""``seftkit prune``: magnitude, Wanda and SparseGPT, unstructured or N:M, for any HF decoder-only model.

Every method is one pruner function ``(weight [out, in], stats, pattern) -> keep-mask`` plus, for the methods
that look at activations, the additive input statistic it needs; the shared layer-by-layer loop in
:mod:`seftkit.prune.calibrate` feeds them. :func:`prune_model` prunes a loaded model in place;
:func:`prune_checkpoint` is load -> prune -> save for the CLI.

Under ``torchrun --nproc-per-node N`` the calibration windows are split across the ranks and their statistics
summed (see :mod:`seftkit.prune.calibrate`); every rank prunes its replica identically (checked) and rank 0 writes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from torch import nn

from seftkit.data import DEFAULT_TRAIN_TEXT
from seftkit.distributed import barrier, check_same_across_ranks, init_distributed
from seftkit.errors import SeftkitError
from seftkit.models import (
    cap_seqlen,
    check_finite,
    find_decoder_layers,
    linear_weight,
    load_model,
    save_model,
    target_linears,
)
from seftkit.prune.calibrate import Statistic, prune_blockwise
from seftkit.prune.magnitude import magnitude_mask
from seftkit.prune.sparsegpt import input_gram, sparsegpt_prune
from seftkit.prune.wanda import input_sq_norms, wanda_mask
from seftkit.sparsity.pattern import SparsityPattern
from seftkit.sparsity.stats import summarize, zero_stats
from seftkit.sparsity.targets import TargetRule

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

REPORT_NAME = "prune_report.json"


@dataclass(frozen=True)
class PruneMethod:
    """A pruner and the input statistic it needs (``None``: no calibration data at all)."""

    name: str
    pruner: Callable[[torch.Tensor, Any, SparsityPattern], torch.Tensor]
    statistic: Statistic | None = None


METHODS: dict[str, PruneMethod] = {
    "magnitude": PruneMethod("magnitude", magnitude_mask),
    "wanda": PruneMethod("wanda", wanda_mask, input_sq_norms),
    "sparsegpt": PruneMethod("sparsegpt", sparsegpt_prune, input_gram),
}


@dataclass
class PruneReport:
    """What was pruned and how (written as ``prune_report.json`` next to the weights and by ``--json``).

    ``tensors`` maps each targeted weight to its shape, zero count, sparsity and N:M validity; ``per_layer`` sums
    them per decoder block; ``calibration`` is ``None`` for magnitude pruning.
    """

    method: str
    pattern: str
    sparsity: float
    nm: str | None
    include: str | None
    exclude: str | None
    calibration: dict[str, Any] | None
    overall_sparsity: float
    per_layer: dict[int, dict[str, float]]
    tensors: dict[str, dict[str, Any]]
    wall_time_s: float
    peak_rss_mb: float
    cuda_max_allocated_mb: float | None
    device: str
    model: str | None = None
    out: str | None = None


def calibration_windows(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """``nsamples`` random ``seqlen``-token windows (seeded), with ``seqlen`` capped to the model's positions."""
    from seftkit.data import token_windows

    if nsamples < 1:
        raise SeftkitError(f"nsamples must be at least 1, got {nsamples}")
    return token_windows(tokenizer, texts, cap_seqlen(model, seqlen), nsamples, seed)


def get_method(name: str) -> PruneMethod:
    if name not in METHODS:
        raise SeftkitError(f"unknown pruning method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]


def _check_targets(targets: dict[str, nn.Module], pattern: SparsityPattern, calibrated: bool, blocks: str) -> None:
    if not targets:
        raise SeftkitError("no weights match the target rule; check --include / --exclude")
    for name, module in targets.items():
        pattern.check_width(f"{name}.weight", linear_weight(module).shape[1])
        if calibrated and not name.startswith(f"{blocks}."):
            raise SeftkitError(
                f"{name} is outside the decoder blocks; Wanda and SparseGPT prune block linears only "
                "(use --method magnitude or narrow --include)"
            )


@torch.no_grad()
def prune_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    method: str,
    pattern: SparsityPattern,
    calib: list[str] | torch.Tensor | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    rule: TargetRule | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place and describe the result.

    ``calib`` is calibration text (cut into ``nsamples`` random ``seqlen``-token windows with ``seed``) or
    ready ``[n, seqlen]`` token windows (the report's seed is then ``None``); magnitude pruning ignores it.
    Everything is validated (finite weights, N:M widths, targets, data length) before the first weight changes.
    """
    spec = get_method(method)
    if batch_size < 1:
        raise SeftkitError(f"batch size must be at least 1, got {batch_size}")
    rule = rule or TargetRule()
    start = time.perf_counter()
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    check_finite(model)
    layers_name, layers = find_decoder_layers(model)
    targets = target_linears(model, rule)
    _check_targets(targets, pattern, spec.statistic is not None, layers_name)

    def prune_linear(name: str, module: nn.Module, stats: torch.Tensor | None) -> None:
        weight = linear_weight(module)
        keep = spec.pruner(weight, stats, pattern)
        weight.masked_fill_(~keep, 0)

    calibration = None
    peak_rss = psutil.Process().memory_info().rss
    model.eval()
    if spec.statistic is None:
        for name, module in targets.items():
            prune_linear(name, module, None)
    else:
        if calib is None:
            raise SeftkitError(f"{method} needs calibration data")
        sampled = not isinstance(calib, torch.Tensor)
        if sampled and tokenizer is None:
            raise SeftkitError(f"{method} needs a tokenizer to cut calibration text into windows")
        windows = calibration_windows(model, tokenizer, calib, nsamples, seqlen, seed) if sampled else calib
        calibration = {"nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                       "seed": seed if sampled else None}
        rss = prune_blockwise(model, layers_name, layers, windows, rule, spec.statistic, prune_linear,
                              batch_size=batch_size, progress=progress)
        peak_rss = max(peak_rss, rss)

    check_same_across_ranks("the pruning masks", {name: linear_weight(m) == 0 for name, m in targets.items()})
    tensor_stats = [zero_stats(f"{name}.weight", (linear_weight(m) == 0).cpu().numpy(), pattern)
                    for name, m in targets.items()]
    summary = summarize(tensor_stats)
    return PruneReport(
        method=method,
        pattern=pattern.describe(),
        sparsity=pattern.fraction,
        nm=f"{pattern.n}:{pattern.m}" if pattern.is_nm else None,
        include=rule.include,
        exclude=rule.exclude,
        calibration=calibration,
        overall_sparsity=summary.sparsity,
        per_layer=summary.per_layer,
        tensors={s.name: {"shape": list(s.shape), "numel": s.numel, "zeros": s.zeros, "sparsity": s.sparsity,
                          "nm_ok": s.nm_ok} for s in tensor_stats},
        wall_time_s=time.perf_counter() - start,
        peak_rss_mb=max(peak_rss, psutil.Process().memory_info().rss) / 2**20,
        cuda_max_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        device=str(device),
    )


def default_out(model_spec: str, method: str, pattern: SparsityPattern) -> Path:
    tag = f"{pattern.n}of{pattern.m}" if pattern.is_nm else f"{round(pattern.fraction * 100)}"
    return Path(f"{Path(str(model_spec)).name}-{method}-{tag}")


def prune_checkpoint(
    model_spec: str | os.PathLike,
    method: str,
    pattern: SparsityPattern,
    out: str | os.PathLike | None = None,
    calib: str = DEFAULT_TRAIN_TEXT,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    rule: TargetRule | None = None,
    device: str = "auto",
    overwrite: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> PruneReport:
    """Load -> prune -> save an HF folder (with ``prune_report.json``) atomically; bad input writes nothing."""
    from seftkit.data import load_texts
    from seftkit.io import atomic_dir, check_output_path, write_json
    from seftkit.models import resolve_device

    out = Path(out) if out is not None else default_out(str(model_spec), method, pattern)
    check_output_path(out, overwrite, inputs=(model_spec,))
    texts = load_texts(calib) if get_method(method).statistic is not None else None
    ranks, device = init_distributed(resolve_device(device))
    model, tokenizer = load_model(model_spec, device=device)
    report = prune_model(model, tokenizer, method, pattern, texts, nsamples=nsamples, seqlen=seqlen, seed=seed,
                         rule=rule, batch_size=batch_size, progress=progress and ranks.is_main)
    if report.calibration is not None:
        report.calibration["data"] = calib
    report.model = str(model_spec)
    report.out = str(out)
    if ranks.is_main:
        with atomic_dir(out, overwrite) as tmp:
            save_model(model, tokenizer, tmp)
            write_json(tmp / REPORT_NAME, report)
    barrier()  # every rank returns once the output exists
    return report


__all__ = [
    "METHODS", "PruneMethod", "PruneReport", "calibration_windows", "get_method", "prune_checkpoint", "prune_model",
]
