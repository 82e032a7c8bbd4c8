"""Layer timing: seftkit's sparse kernels against the fastest dense baseline, measured honestly.

Hygiene, because a decode-size product is a memory-bandwidth measurement and easy to flatter:
- streaming: every backend cycles through enough copies of its weight that the copies outsize the L3
  cache twice, so each call reads DRAM as in a real model (a single hot 4096x4096 matrix would sit in cache);
- warm-up first, then interleaved rounds (the backends take turns, order rotated every round) so drift in a
  shared machine's load hits all of them alike; min and median per backend are kept;
- the headline speedup is against the *fastest* dense torch ``F.linear`` on this CPU, bf16 or fp32 weights
  (the row names the winner: without native bf16, fp32 dense is often faster), with the same-dtype figure as
  a second column and the ceiling (dense bytes / sparse bytes) beside it; where sparse is slower the row says so;
- every backend's achieved GB/s (weight bytes streamed per call / time) is shown against this machine's
  streaming read bandwidth, measured in the same run, so the fraction of the limit is visible;
- ``auto`` is what ``sparsify_model`` runs: per batch-size bucket the faster of kernel and dense (same dtype).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from seftkit.errors import SeftkitError
from seftkit.kernels import cuda24
from seftkit.kernels.build import kernel_isa, native
from seftkit.kernels.formats import BitmapWeight, pack_bitmap
from seftkit.kernels.sparse_linear import SparseLinear
from seftkit.sparsity.masks import pattern_mask
from seftkit.sparsity.pattern import SparsityPattern

# Linear shapes of one decoder block, with how often each occurs (q, k, v, o; gate, up; down).
LLAMA7B_BLOCK = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}
SMOLLM2_BLOCK = {(576, 576): 2, (192, 576): 2, (1536, 576): 2, (576, 1536): 1}
DENSE_BACKENDS = {"dense-bf16": torch.bfloat16, "dense-fp32": torch.float32}
CPU_BACKENDS = (*DENSE_BACKENDS, "sparse", "auto", "csr")
BACKENDS = (*CPU_BACKENDS, "cuda24")
DEFAULT_BACKENDS = ("dense-bf16", "dense-fp32", "sparse", "auto")
_FALLBACK_L3 = 32 << 20
_REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vbmi2", "avx512_bf16", "amx_bf16")


@dataclass
class Timing:
    min_ms: float
    median_ms: float
    bytes_per_weight: float
    copies: int
    gbps: float = 0.0  # weight bytes per call / min time


@dataclass
class LayerResult:
    shape: tuple[int, int]
    batch: int
    timings: dict[str, Timing]
    fastest_dense: str | None = None  # the dense backend with the lowest min time
    speedup: float | None = None  # fastest dense min / sparse min
    speedup_median: float | None = None  # the same backends' medians
    speedup_same_dtype: float | None = None  # dense in the sparse weights' dtype, min / sparse min
    auto_vs_dense: float | None = None  # auto min / same-dtype dense min: above 1.05 the choice regressed
    ceiling: float | None = None  # same-dtype dense bytes / sparse bytes: the most a bandwidth-bound kernel gains
    cuda_speedup: float | None = None


@dataclass
class SetTotal:
    """A layer set (a decoder block, a whole model) timed as the count-weighted sum of its shapes."""

    name: str
    batch: int
    fastest_dense: str
    dense_ms: float
    sparse_ms: float
    speedup: float


@dataclass
class MachineInfo:
    threads: int
    cpu: str
    cpu_flags: list[str]
    kernel_isa: str
    l3_bytes: int
    stream_bytes: int
    stream_read_gbps: float | None  # a plain read of stream_bytes at this thread count (None without streaming)
    torch: str = torch.__version__


@dataclass
class LayerBench:
    pattern: str
    dtype: str
    machine: MachineInfo
    results: list[LayerResult] = field(default_factory=list)
    totals: list[SetTotal] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it did not run


def l3_bytes() -> int:
    """The last-level cache size from sysfs (a 32 MiB guess when the kernel does not say)."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                text = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
                return int(text.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
    return _FALLBACK_L3


def stream_read_gbps(nbytes: int, rounds: int = 5) -> float:
    """This machine's streaming read bandwidth: best of ``rounds`` sums over a buffer of ``nbytes``."""
    buffer = torch.ones(max(nbytes, 1 << 20) // 4)
    buffer.sum()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def machine_info(stream_bytes: int) -> MachineInfo:
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = kernel_isa().name.lower() if native() is not None else "unavailable (dense fallback)"
    return MachineInfo(torch.get_num_threads(), cpu, [f for f in _REPORTED_FLAGS if f in flags], isa,
                       l3_bytes(), stream_bytes, stream_read_gbps(stream_bytes) if stream_bytes else None)


def random_pruned(shape: tuple[int, int], pattern: SparsityPattern, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A random weight pruned to the pattern by magnitude (unstructured: per row, as Wanda prunes)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator)
    return (weight * pattern_mask(weight.abs(), pattern, per_row=True)).to(dtype)


@dataclass
class _Backend:
    """How one backend holds a weight and computes ``x @ W.T`` with it."""

    name: str
    operand: Callable[[torch.Tensor], Any]
    call: Callable[[torch.Tensor, Any], torch.Tensor]
    nbytes: Callable[[Any], int]
    x_dtype: torch.dtype


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _sparse_call(isa: int) -> Callable[[torch.Tensor, BitmapWeight], torch.Tensor]:
    """The kernel call with the module and ISA resolved once, so per-call overhead matches ``F.linear``."""
    matmul = native().bitmap_matmul

    def call(x: torch.Tensor, packed: BitmapWeight) -> torch.Tensor:
        return matmul(x, packed.values, packed.bits, packed.row_ptr, packed.shape[1], isa)

    return call


def _to_csr(weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta state"
        return weight.float().to_sparse_csr()


def _csr_bytes(w: torch.Tensor) -> int:
    return sum(_tensor_bytes(t) for t in (w.values(), w.crow_indices(), w.col_indices()))


def _auto_operand(dtype: torch.dtype) -> Callable[[torch.Tensor], SparseLinear]:
    def operand(w: torch.Tensor) -> SparseLinear:
        return SparseLinear(pack_bitmap(w.to(dtype)))

    return operand


def _dense_operand(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: w.to(dtype).contiguous()


def _auto_bytes(layer: SparseLinear) -> int:
    dense = layer.dense_copy
    return layer.packed.nbytes + (0 if dense is None else _tensor_bytes(dense))


def cpu_backends(names: tuple[str, ...], dtype: torch.dtype) -> list[_Backend]:
    """The CPU backends in ``names`` (``sparse`` and ``auto`` need the native kernels built)."""
    table = {name: _Backend(name, _dense_operand(d), F.linear, _tensor_bytes, d) for name, d in DENSE_BACKENDS.items()}
    table["csr"] = _Backend("csr", _to_csr, lambda x, w: torch.mm(w, x.T).T, _csr_bytes, torch.float32)
    if native() is not None:
        table["sparse"] = _Backend("sparse", lambda w: pack_bitmap(w.to(dtype)), _sparse_call(int(kernel_isa())),
                                   lambda p: p.nbytes, dtype)
        table["auto"] = _Backend("auto", _auto_operand(dtype), lambda x, layer: layer(x), _auto_bytes, dtype)
    return [table[name] for name in names if name in table]


def same_dtype_dense(dtype: torch.dtype) -> str:
    return next(name for name, d in DENSE_BACKENDS.items() if d == dtype)


def _clone(operand: Any) -> Any:
    if isinstance(operand, SparseLinear):
        return SparseLinear(operand.packed.clone(), operand.bias, operand.isa)
    return operand.clone()


def _footprint(operand: Any, nbytes: int) -> int:
    """Bytes one copy may hold: an ``auto`` layer can add a dense copy once dense wins a batch size."""
    if isinstance(operand, SparseLinear):
        return nbytes + operand.out_features * operand.in_features * operand.values.element_size()
    return nbytes


def _copies(backend: _Backend, weight: torch.Tensor, stream_bytes: int) -> list[Any]:
    first = backend.operand(weight)
    count = max(1, math.ceil(stream_bytes / _footprint(first, backend.nbytes(first))))
    return [first] + [_clone(first) for _ in range(count - 1)]


def _time_round(backend: _Backend, x: torch.Tensor, operands: list[Any], min_calls: int) -> float:
    calls = max(len(operands), min_calls)
    start = time.perf_counter()
    for i in range(calls):
        backend.call(x, operands[i % len(operands)])
    return (time.perf_counter() - start) * 1e3 / calls


def _speedups(result: LayerResult, dtype: torch.dtype) -> None:
    t = result.timings
    dense = [name for name in DENSE_BACKENDS if name in t]
    if dense:
        result.fastest_dense = min(dense, key=lambda name: t[name].min_ms)
    same = t.get(same_dtype_dense(dtype))
    if "auto" in t and same is not None:
        result.auto_vs_dense = t["auto"].min_ms / same.min_ms
    if "sparse" not in t or not dense:
        return
    result.speedup = t[result.fastest_dense].min_ms / t["sparse"].min_ms
    result.speedup_median = t[result.fastest_dense].median_ms / t["sparse"].median_ms
    if same is not None:
        result.speedup_same_dtype = same.min_ms / t["sparse"].min_ms
        result.ceiling = same.bytes_per_weight / t["sparse"].bytes_per_weight


def bench_shape(weight: torch.Tensor, batches: list[int], backends: list[_Backend], rounds: int,
                stream_bytes: int, dtype: torch.dtype, min_calls: int = 4) -> list[LayerResult]:
    """Time every backend on one pruned weight for every batch size, interleaved."""
    shape = tuple(weight.shape)
    operands = {b.name: _copies(b, weight, stream_bytes) for b in backends}
    weights = shape[0] * shape[1]
    results = []
    for batch in batches:
        xs = {b.name: torch.randn(batch, shape[1]).to(b.x_dtype) for b in backends}
        for b in backends:  # warm-up: one full cycle (caches, oneDNN primitives, page faults)
            _time_round(b, xs[b.name], operands[b.name], 1)
        times: dict[str, list[float]] = {b.name: [] for b in backends}
        for r in range(rounds):
            order = backends[r % len(backends):] + backends[: r % len(backends)]
            for b in order:
                times[b.name].append(_time_round(b, xs[b.name], operands[b.name], min_calls))
        timings = {}
        for b in backends:
            nbytes = b.nbytes(operands[b.name][0])
            timings[b.name] = Timing(min(times[b.name]), statistics.median(times[b.name]), nbytes / weights,
                                     len(operands[b.name]), nbytes / min(times[b.name]) / 1e6)
        result = LayerResult(shape, batch, timings)
        _speedups(result, dtype)
        results.append(result)
    return results


def bench_cuda24_shape(result_rows: list[LayerResult], shape: tuple[int, int], pattern: SparsityPattern,
                       rounds: int) -> None:
    """Add GPU dense vs 2:4 timings (CUDA events) to the CPU rows of this shape."""
    weight = random_pruned(shape, pattern, torch.bfloat16).cuda()
    sparse = cuda24.to_cuda24(weight)
    for row in result_rows:
        dense_min, dense_med = cuda24.time_linear_ms(weight, row.batch, rounds)
        sparse_min, sparse_med = cuda24.time_linear_ms(sparse, row.batch, rounds)
        row.timings["cuda-dense"] = Timing(dense_min, dense_med, 2.0, 1)
        row.timings["cuda24"] = Timing(sparse_min, sparse_med, 1.125, 1)
        row.cuda_speedup = dense_min / sparse_min


def set_totals(results: list[LayerResult], sets: dict[str, dict[tuple[int, int], int]]) -> list[SetTotal]:
    """Fastest dense and sparse time of each layer set per batch (sum of count x min time over its shapes); the
    dense figure is the one dense dtype that is fastest over the whole set."""
    found = {(r.shape, r.batch): r.timings for r in results if "sparse" in r.timings}
    totals = []
    for name, counts in sets.items():
        for batch in sorted({r.batch for r in results}):
            if not all((shape, batch) in found for shape in counts):
                continue
            total = {backend: sum(n * found[shape, batch][backend].min_ms for shape, n in counts.items())
                     for backend in (*DENSE_BACKENDS, "sparse")
                     if all(backend in found[shape, batch] for shape in counts)}
            dense = [d for d in DENSE_BACKENDS if d in total]
            if dense:
                fastest = min(dense, key=total.__getitem__)
                totals.append(SetTotal(name, batch, fastest, total[fastest], total["sparse"],
                                       total[fastest] / total["sparse"]))
    return totals


def bench_layers(shapes: list[tuple[int, int]], pattern: SparsityPattern, batches: list[int],
                 dtype: torch.dtype, backends: tuple[str, ...] = DEFAULT_BACKENDS, rounds: int = 5,
                 streaming: bool = True, weights: dict[tuple[int, int], torch.Tensor] | None = None,
                 sets: dict[str, dict[tuple[int, int], int]] | None = None, progress: bool = True) -> LayerBench:
    """Time each shape x batch on each backend; see the module docstring for the method.

    ``weights`` gives a model's own pruned weight per shape; other shapes get random pruned weights.
    ``sets`` names layer sets (shape -> count) to total, e.g. one decoder block.
    """
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise SeftkitError(f"unknown backend {unknown[0]!r}: use {', '.join(BACKENDS)}")
    if rounds < 1 or not batches or min(batches) < 1:
        raise SeftkitError("--rounds and every --batch must be positive integers")
    stream_bytes = 2 * l3_bytes() if streaming else 0
    report = LayerBench(pattern.describe(), str(dtype).removeprefix("torch."), machine_info(stream_bytes))
    chosen = cpu_backends(tuple(backends), dtype)
    for name in ("sparse", "auto"):
        if name in backends and native() is None:
            report.skipped[name] = "native kernels could not be built (see the warning above)"
    cuda_reason = None
    if "cuda24" in backends:
        cuda_reason = cuda24.unavailable_reason() or (None if pattern.is_nm and (pattern.n, pattern.m) == (2, 4)
                                                      else f"needs --nm 2:4, not {pattern.describe()}")
        if cuda_reason:
            report.skipped["cuda24"] = cuda_reason
    for shape in tqdm(shapes, desc="bench layers", unit="shape", disable=not progress):
        weight = weights[shape] if weights and shape in weights else random_pruned(shape, pattern, dtype)
        rows = bench_shape(weight, batches, chosen, rounds, stream_bytes, dtype)
        if "cuda24" in backends and cuda_reason is None:
            unfit = cuda24.weight_unfit_reason(random_pruned(shape, pattern, torch.bfloat16))
            if unfit:
                report.skipped[f"cuda24 {shape[0]}x{shape[1]}"] = unfit
            else:
                bench_cuda24_shape(rows, shape, pattern, rounds)
        report.results.extend(rows)
    report.totals = set_totals(report.results, sets or {})
    return report


def format_layers(report: LayerBench) -> list[str]:
    """Human summary lines for stdout: one row per shape x batch, the losses marked."""
    m = report.machine
    stream = (f"streaming {m.stream_bytes / 2**20:.0f} MiB per backend, read bandwidth {m.stream_read_gbps:.1f} GB/s"
              if m.stream_bytes else "hot cache (no streaming)")
    names = [n for n in (*DENSE_BACKENDS, "sparse", "auto") if any(n in r.timings for r in report.results)]
    lines = [
        f"layers: {report.pattern}, {report.dtype} weights, {m.threads} thread(s), kernels {m.kernel_isa}, "
        f"{stream} (L3 {m.l3_bytes / 2**20:.0f} MiB); CPU flags: {' '.join(m.cpu_flags) or 'none'}",
        f"{'shape':>12} {'batch':>5} " + " ".join(f"{n + ' ms':>14}" for n in names)
        + f" {'fastest':>10} {'speedup':>8} {'median':>7} {'same-dt':>8} {'auto/dn':>8} {'ceiling':>8}  GB/s",
    ]
    for r in report.results:
        t = r.timings
        cells = [f"{r.shape[0]}x{r.shape[1]:<5}".rjust(12), f"{r.batch:>5}"]
        cells += [f"{t[n].min_ms:14.3f}" if n in t else f"{'-':>14}" for n in names]
        cells.append(f"{(r.fastest_dense or '-').removeprefix('dense-'):>10}")
        cells += [f"{v:7.2f}x" if v is not None else f"{'-':>8}" for v in (r.speedup, r.speedup_median,
                                                                           r.speedup_same_dtype, r.auto_vs_dense,
                                                                           r.ceiling)]
        cells.append("  " + " ".join(f"{n.removeprefix('dense-')} {t[n].gbps:.1f}" for n in names if n in t))
        if r.speedup is not None and r.speedup < 1:
            cells.append("  sparse slower")
        if r.auto_vs_dense is not None and r.auto_vs_dense > 1.05:
            cells.append("  auto > 5% slower than dense")
        if r.cuda_speedup is not None:
            cells.append(f"  cuda24 {r.cuda_speedup:.2f}x")
        lines.append(" ".join(cells))
    lines += [f"{t.name}, batch {t.batch}: fastest dense ({t.fastest_dense}) {t.dense_ms:.2f} ms, sparse "
              f"{t.sparse_ms:.2f} ms: {t.speedup:.2f}x" + ("  (sparse slower)" if t.speedup < 1 else "")
              for t in report.totals]
    lines += [f"skipped {name}: {why}" for name, why in report.skipped.items()]
    lines.append("speedup = fastest dense min / sparse min (its median beside it); same-dt = against dense in the "
                 "sparse weights' dtype; auto/dn = sparsify_model's choice / same-dtype dense (<= 1.05 is the bar); "
                 "ceiling = same-dtype dense bytes / sparse bytes; GB/s = weight bytes per call / min time")
    return lines
