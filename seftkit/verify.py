"""Prove that a saved model is as sparse as claimed, from its safetensors bytes alone.

This is what CI pipelines call after prune/repair, so it must be dependable and light: it never imports
torch or instantiates the model, reads one tensor at a time (memory O(largest tensor)), and counts exact
zeros on the raw bits (see :mod:`seftkit.sparsity.scanner`). It selects weights with the same
:class:`~seftkit.sparsity.targets.TargetRule` that prune and repair use, so "targeted" means the same thing
everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seftkit.errors import SeftkitError
from seftkit.models import builtin_names, resolve_model_path
from seftkit.sparsity.pattern import SparsityPattern
from seftkit.sparsity.scanner import (
    MappedFiles,
    TensorInfo,
    checkpoint_files,
    load_json,
    raw_dtype,
    read_checkpoint,
    row_blocks,
    zero_mask,
)
from seftkit.sparsity.stats import TensorStats, summarize, zero_stats
from seftkit.sparsity.targets import TRANSPOSED_MODEL_TYPES, TargetRule

DEFAULT_TOL = 0.001
# Absorbs float rounding in ``S - tol`` so a tensor at exactly the bar passes.
_EPS = 1e-12


@dataclass
class Violation:
    """The first group of M inputs with fewer than N zeros, in [out, in] coordinates (row-major order)."""

    row: int
    column: int


@dataclass
class TensorCheck:
    name: str
    shape: list[int]
    dtype: str
    numel: int
    zeros: int
    sparsity: float
    passed: bool
    shortfall: float | None = None  # fraction of zeros missing to reach --sparsity S - tol
    nm_ok: bool | None = None
    nm_violations: int | None = None  # groups with fewer than N zeros
    first_violation: Violation | None = None


@dataclass
class Totals:
    numel: int
    zeros: int
    sparsity: float


@dataclass
class Thresholds:
    sparsity: float | None
    tol: float
    nm: str | None
    include: str | None
    exclude: str | None


@dataclass
class VerifyReport:
    model: str
    model_type: str
    files: list[str]
    transposed: bool  # linear weights stored [in, out] (GPT-2 Conv1D): N:M groups run down the columns
    thresholds: Thresholds
    overall: Totals
    per_layer: dict[int, Totals] = field(default_factory=dict)
    tensors: list[TensorCheck] = field(default_factory=list)
    scanned_bytes: int = 0

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tensors)

    @property
    def failures(self) -> list[TensorCheck]:
        return [t for t in self.tensors if not t.passed]

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: the fields plus ``passed``, with ``overall`` under the key ``global``."""
        data = dataclasses.asdict(self)
        data["global"] = data.pop("overall")
        return {"passed": self.passed, **data}


def resolve_checkpoint(spec: str | os.PathLike) -> tuple[Path, list[Path]]:
    """``(folder, safetensors files)`` for a model folder, a single ``.safetensors`` file or a built-in name."""
    if str(spec) in builtin_names():
        folder = resolve_model_path(str(spec))
        return folder, checkpoint_files(folder)
    path = Path(spec).expanduser()
    if not path.exists():
        raise SeftkitError(f"model path {spec} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SeftkitError(f"{spec} is not a model folder or a .safetensors file")
        return path.parent, [path]
    files = checkpoint_files(path)
    if not files:
        raise SeftkitError(f"{spec} is not a model folder: it has no *.safetensors weights (verify reads safetensors)")
    return path, files


def _model_type(folder: Path) -> str:
    """The config's ``model_type`` ("" without a config), read as untrusted JSON."""
    config = folder / "config.json"
    if not config.is_file():
        return ""
    try:
        data = load_json(config.read_bytes())
    except OSError as exc:
        raise SeftkitError(f"cannot read {config}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise SeftkitError(f"{config} is not valid JSON (a JSON object)")
    return str(data.get("model_type", ""))


def _check_tol(tol: float) -> float:
    if tol != tol or not 0.0 <= tol < 1.0:
        raise SeftkitError(f"tolerance must be in [0, 1), got {tol}")
    return float(tol)


def scan_tensor(
    info: TensorInfo, files: MappedFiles, pattern: SparsityPattern | None = None, transposed: bool = False
) -> TensorStats:
    """Zero count (and N:M validity) of one 2-D tensor, in row blocks so temporaries stay small.

    ``transposed`` tensors are stored [in, out]: blocks then hold whole groups of M inputs, and the first
    violation is the smallest (out row, in column) over all blocks, as for an [out, in] tensor.
    """
    nm = pattern if pattern is not None and pattern.is_nm else None
    if info.numel == 0:  # nothing to count, and the other dimension may be too big to view (0 x 2**62)
        raw_dtype(info)
        empty = TensorStats(name=info.name, shape=info.shape, numel=0, zeros=0)
        if nm is not None:
            empty.nm_ok, empty.nm_violations = True, 0
        return empty
    raw = files.raw(info)
    rows, cols = raw.shape
    zeros, bad_groups, first = 0, 0, None
    for block in row_blocks(rows, cols, multiple=nm.m if nm and transposed else 1):
        stats = zero_stats(info.name, zero_mask(raw[block], info.dtype), nm, transposed)
        zeros += stats.zeros
        bad_groups += stats.nm_violations or 0
        if stats.nm_first_violation is not None:
            row, col = stats.nm_first_violation
            here = (row, col + block.start) if transposed else (row + block.start, col)
            first = here if first is None else min(first, here)
    result = TensorStats(name=info.name, shape=info.shape, numel=info.numel, zeros=zeros)
    if nm is not None:
        result.nm_ok, result.nm_violations, result.nm_first_violation = bad_groups == 0, bad_groups, first
    return result


def _check(info: TensorInfo, stats: TensorStats, pattern: SparsityPattern | None, tol: float) -> TensorCheck:
    check = TensorCheck(name=info.name, shape=list(info.shape), dtype=info.dtype, numel=stats.numel,
                        zeros=stats.zeros, sparsity=stats.sparsity, passed=True)
    if pattern is None:
        return check
    if pattern.is_nm:
        check.nm_ok, check.nm_violations = stats.nm_ok, stats.nm_violations
        if stats.nm_first_violation is not None:
            check.first_violation = Violation(*stats.nm_first_violation)
        check.passed = bool(stats.nm_ok)
    else:
        required = pattern.fraction - tol
        check.passed = stats.sparsity >= required - _EPS
        if not check.passed:
            check.shortfall = required - stats.sparsity
    return check


def verify_model(
    path: str | os.PathLike,
    pattern: SparsityPattern | None = None,
    tol: float = DEFAULT_TOL,
    rule: TargetRule | None = None,
    *,
    progress: bool = False,
) -> VerifyReport:
    """Count exact zeros in every targeted weight and check them against ``pattern``.

    A weight meets an unstructured pattern when its fraction of zeros is at least ``sparsity - tol``, and
    an N:M pattern when every group of M consecutive inputs of every row holds at least N zeros. Without a
    pattern the report only measures. Raises :class:`SeftkitError` for bad input (missing or corrupt
    files, a tolerance outside [0, 1), M not dividing an input width, no weight selected).
    """
    tol = _check_tol(tol)
    rule = rule or TargetRule()
    folder, files = resolve_checkpoint(path)
    mtype = _model_type(folder)
    transposed = mtype in TRANSPOSED_MODEL_TYPES
    targets = [t for t in read_checkpoint(files) if rule.matches(t.name, len(t.shape))]
    if not targets:
        raise SeftkitError(f"no weights in {path} match the target rule (check --include/--exclude)")
    if pattern is not None:
        for info in targets:
            pattern.check_width(info.name, info.shape[0] if transposed else info.shape[1])

    checks, all_stats = [], []
    mapped = MappedFiles()
    scanned = sum(t.nbytes for t in targets)
    with _progress(scanned, progress) as bar:
        for info in targets:
            stats = scan_tensor(info, mapped, pattern, transposed)
            all_stats.append(stats)
            checks.append(_check(info, stats, pattern, tol))
            bar.update(info.nbytes)

    summary = summarize(all_stats)
    return VerifyReport(
        model=str(path),
        model_type=mtype,
        files=[str(f) for f in files],
        transposed=transposed,
        thresholds=Thresholds(
            sparsity=None if pattern is None or pattern.is_nm else pattern.fraction,
            tol=tol,
            nm=f"{pattern.n}:{pattern.m}" if pattern is not None and pattern.is_nm else None,
            include=rule.include,
            exclude=rule.exclude,
        ),
        overall=Totals(summary.numel, summary.zeros, summary.sparsity),
        per_layer={i: Totals(int(v["numel"]), int(v["zeros"]), v["sparsity"]) for i, v in summary.per_layer.items()},
        tensors=checks,
        scanned_bytes=scanned,
    )


class _NoBar:
    def update(self, _: int) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:  # the light CI install (click + numpy) has no progress bar
        return contextlib.nullcontext(_NoBar())

    return tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not enabled, leave=False)
