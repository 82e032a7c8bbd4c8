"""Load -> prune -> save, in memory or block by block; see :mod:`seftkit.prune` for the overview."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from torch import nn

from seftkit.data import DEFAULT_TRAIN_TEXT
from seftkit.distributed import barrier, check_same_across_ranks, init_distributed, world
from seftkit.errors import SeftkitError
from seftkit.models import (
    cap_seqlen,
    check_finite,
    choose_dtype,
    find_decoder_layers,
    linear_weight,
    load_model,
    resolve_dtype,
    resolve_model_path,
    save_model,
    target_linears,
)
from seftkit.prune.calibrate import prune_blockwise
from seftkit.prune.registry import PrunerSpec, get_pruner
from seftkit.sparsity.pattern import SparsityPattern
from seftkit.sparsity.stats import TensorStats, summarize, zero_stats
from seftkit.sparsity.targets import TargetRule

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from seftkit.prune.streaming import StreamedCheckpoint

log = logging.getLogger(__name__)

REPORT_NAME = "prune_report.json"


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
    dtype: str = "fp32"
    low_memory: bool = False
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


def _check_targets(targets: dict[str, nn.Module], pattern: SparsityPattern, spec: PrunerSpec, blocks: str) -> None:
    if not targets:
        raise SeftkitError("no weights match the target rule; check --include / --exclude")
    if pattern.is_nm and not spec.supports_nm:
        raise SeftkitError(f"{spec.name} does not prune to N:M patterns; choose another --method")
    for name, module in targets.items():
        pattern.check_width(f"{name}.weight", linear_weight(module).shape[1])
        if spec.needs_calibration and not name.startswith(f"{blocks}."):
            raise SeftkitError(
                f"{name} is outside the decoder blocks; calibrated pruners prune block linears only "
                "(use --method magnitude or narrow --include)"
            )


class _Pruning:
    """One pruning run's method, pattern and per-tensor results, shared by the in-memory and streamed paths."""

    def __init__(self, method: str, pattern: SparsityPattern, rule: TargetRule, batch_size: int) -> None:
        if batch_size < 1:
            raise SeftkitError(f"batch size must be at least 1, got {batch_size}")
        self.spec = get_pruner(method)
        self.pruner = self.spec.load_pruner()
        self.statistic = self.spec.load_statistic()
        self.pattern, self.rule = pattern, rule
        self.stats: dict[str, TensorStats] = {}
        self.start = time.perf_counter()
        self.peak_rss = psutil.Process().memory_info().rss

    def prune_linear(self, name: str, module: nn.Module, stats: torch.Tensor | None) -> None:
        weight = linear_weight(module)
        keep = self.pruner(weight, stats, self.pattern)
        weight.masked_fill_(~keep, 0)
        self.stats[name] = zero_stats(f"{name}.weight", (weight == 0).cpu().numpy(), self.pattern)

    def windows(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None,
                calib: list[str] | torch.Tensor | None, nsamples: int, seqlen: int,
                seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Calibration windows and their description for the report."""
        if calib is None:
            raise SeftkitError(f"{self.spec.name} needs calibration data")
        sampled = not isinstance(calib, torch.Tensor)
        if sampled and tokenizer is None:
            raise SeftkitError(f"{self.spec.name} needs a tokenizer to cut calibration text into windows")
        windows = calibration_windows(model, tokenizer, calib, nsamples, seqlen, seed) if sampled else calib
        return windows, {"nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
                         "seed": seed if sampled else None}

    def report(self, targets: dict[str, nn.Module], calibration: dict[str, Any] | None, device: torch.device,
               dtype: torch.dtype, low_memory: bool) -> PruneReport:
        tensor_stats = [self.stats[name] for name in targets]
        summary = summarize(tensor_stats)
        pattern = self.pattern
        return PruneReport(
            method=self.spec.name,
            pattern=pattern.describe(),
            sparsity=pattern.fraction,
            nm=f"{pattern.n}:{pattern.m}" if pattern.is_nm else None,
            include=self.rule.include,
            exclude=self.rule.exclude,
            calibration=calibration,
            overall_sparsity=summary.sparsity,
            per_layer=summary.per_layer,
            tensors={s.name: {"shape": list(s.shape), "numel": s.numel, "zeros": s.zeros, "sparsity": s.sparsity,
                              "nm_ok": s.nm_ok} for s in tensor_stats},
            wall_time_s=time.perf_counter() - self.start,
            peak_rss_mb=max(self.peak_rss, psutil.Process().memory_info().rss) / 2**20,
            cuda_max_allocated_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            low_memory=low_memory,
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
    run = _Pruning(method, pattern, rule or TargetRule(), batch_size)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    check_finite(model)
    layers_name, layers = find_decoder_layers(model)
    targets = target_linears(model, run.rule)
    _check_targets(targets, pattern, run.spec, layers_name)
    calibration = None
    model.eval()
    if run.statistic is None:
        for name, module in targets.items():
            run.prune_linear(name, module, None)
    else:
        windows, calibration = run.windows(model, tokenizer, calib, nsamples, seqlen, seed)
        rss = prune_blockwise(model, layers_name, layers, windows, run.rule, run.statistic, run.prune_linear,
                              batch_size=batch_size, progress=progress)
        run.peak_rss = max(run.peak_rss, rss)
    check_same_across_ranks("the pruning masks", {name: linear_weight(m) == 0 for name, m in targets.items()})
    return run.report(targets, calibration, device, next(model.parameters()).dtype, low_memory=False)


@torch.no_grad()
def prune_streamed(
    folder: Path,
    out: Path,
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
    dtype: str = "auto",
    device: str = "cpu",
) -> PruneReport:
    """Prune the checkpoint in ``folder`` into the existing folder ``out`` with one decoder block in memory at a
    time (see :mod:`seftkit.prune.streaming`); masks and weights are those :func:`prune_model` gives."""
    from seftkit.prune.streaming import StreamedCheckpoint, empty_model

    run = _Pruning(method, pattern, rule or TargetRule(), batch_size)
    if world().distributed:
        raise SeftkitError("--low-memory runs in one process; drop torchrun or --low-memory")
    torch_dtype = resolve_dtype(choose_dtype(folder, dtype))
    model = empty_model(folder, torch_dtype)
    layers_name, layers = find_decoder_layers(model)
    targets = target_linears(model, run.rule)
    _check_targets(targets, pattern, run.spec, layers_name)
    windows, calibration = (run.windows(model, tokenizer, calib, nsamples, seqlen, seed) if run.statistic
                            else (None, None))
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    checkpoint = StreamedCheckpoint(folder, out, model, layers_name, len(layers), torch_dtype, torch_device)
    checkpoint.load_rest()
    if run.statistic is None:
        _prune_streamed_magnitude(run, checkpoint, targets, len(layers))
    else:
        rss = prune_blockwise(model, layers_name, layers, windows, run.rule, run.statistic, run.prune_linear,
                              batch_size=batch_size, progress=progress, residency=checkpoint)
        run.peak_rss = max(run.peak_rss, rss)
    checkpoint.finish(folder)
    return run.report(targets, calibration, torch_device, torch_dtype, low_memory=True)


def _prune_streamed_magnitude(run: _Pruning, checkpoint: StreamedCheckpoint, targets: dict[str, nn.Module],
                              num_blocks: int) -> None:
    """No calibration: prune the targets outside the blocks, write them, then each block in turn."""
    for index in (None, *range(num_blocks)):
        if index is not None:
            checkpoint.load(index)
        for name, module in targets.items():
            if checkpoint.block_of(name) == index:
                run.prune_linear(name, module, None)
        if index is None:
            checkpoint.write_rest()
        else:
            checkpoint.release(index)


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
    dtype: str = "auto",
    low_memory: bool = False,
) -> PruneReport:
    """Load -> prune -> save an HF folder (with ``prune_report.json``) atomically; bad input writes nothing.

    ``dtype`` is the weights' dtype in memory and in the output (``auto``: the checkpoint's own); statistics are
    fp32 whatever it is. ``low_memory`` keeps one decoder block in memory at a time (:func:`prune_streamed`).
    """
    from seftkit.data import load_texts
    from seftkit.io import atomic_dir, check_output_path, write_json
    from seftkit.models import resolve_device

    out = Path(out) if out is not None else default_out(str(model_spec), method, pattern)
    check_output_path(out, overwrite, inputs=(model_spec,))
    folder = resolve_model_path(model_spec)
    dtype = choose_dtype(folder, dtype)
    texts = load_texts(calib) if get_pruner(method).needs_calibration else None
    ranks, device = init_distributed(resolve_device(device))
    if low_memory:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        with atomic_dir(out, overwrite) as tmp:
            report = prune_streamed(folder, tmp, tokenizer, method, pattern, texts, nsamples=nsamples, seqlen=seqlen,
                                    seed=seed, rule=rule, batch_size=batch_size, progress=progress, dtype=dtype,
                                    device=device)
            tokenizer.save_pretrained(tmp)
            _describe(report, model_spec, out, calib)
            write_json(tmp / REPORT_NAME, report)
        return report
    model, tokenizer = load_model(model_spec, device=device, dtype=dtype)
    report = prune_model(model, tokenizer, method, pattern, texts, nsamples=nsamples, seqlen=seqlen, seed=seed,
                         rule=rule, batch_size=batch_size, progress=progress and ranks.is_main)
    _describe(report, model_spec, out, calib)
    if ranks.is_main:
        with atomic_dir(out, overwrite) as tmp:
            save_model(model, tokenizer, tmp)
            write_json(tmp / REPORT_NAME, report)
    barrier()  # every rank returns once the output exists
    return report


def _describe(report: PruneReport, model_spec: str | os.PathLike, out: Path, calib: str) -> None:
    if report.calibration is not None:
        report.calibration["data"] = calib
    report.model = str(model_spec)
    report.out = str(out)


__all__ = ["REPORT_NAME", "PruneReport", "calibration_windows", "default_out", "prune_checkpoint", "prune_model",
           "prune_streamed"]
