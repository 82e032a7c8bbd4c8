"""Native sparse kernels: exact packing, parity with dense matmul, model swap-in, fallbacks, CUDA skips."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from seftkit.bench.layers import bench_layers, format_layers
from seftkit.errors import SeftkitError
from seftkit.kernels import Isa, SparseLinear, build, cuda24, kernel_isa, native, pack_bitmap, pack_nm, sparsify_model
from seftkit.kernels.formats import VALUE_PAD
from seftkit.sparsity.masks import nm_mask, unstructured_mask
from seftkit.sparsity.pattern import SparsityPattern

CPU_ISA = Isa(native().cpu_isa()) if native() is not None else Isa.PORTABLE
# Every level is collected; those this CPU lacks are skipped with the reason, so `pytest -rs` lists them.
LEVELS = [pytest.param(level, id=level.name.lower(),
                       marks=pytest.mark.skipif(level > CPU_ISA, reason=f"this CPU lacks {level.name.lower()} "
                                                                        f"(best here: {CPU_ISA.name.lower()})"))
          for level in Isa]
DTYPES = (torch.float32, torch.bfloat16)
# (weight dtype, activation dtype): bf16 x bf16 is the only pair that reaches the AVX-512 BF16 dot product
OPERANDS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
# in_features with tails 1..31 mod 32 (1, 7, 31, 1, 18, 31, 17, 9) and one whole word
WIDTHS = (1, 7, 31, 33, 50, 95, 145, 73, 128)
# batch tiles are 4 rows: 1-4 each give one tile of that size, 7 ends in a tile of 3, 10 in one of 2
BATCHES = (1, 2, 3, 4, 7, 10)


def pruned(rows: int, cols: int, dtype: torch.dtype, sparsity: float | None = None,
           nm: tuple[int, int] | None = None, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    weight = torch.randn(rows, cols)
    keep = nm_mask(weight.abs(), *nm) if nm else unstructured_mask(weight.abs(), sparsity)
    return (weight * keep).to(dtype)


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Parity with the exact product of the same (already rounded) operands, within what fp32 accumulation of
    ``in`` terms (two roundings per step, for the bf16 dot product) plus the output's own rounding can explain."""
    exact = x.double() @ weight.double().T
    accumulation = 2 * x.shape[1] * 2.0**-24 * (x.double().abs() @ weight.double().abs().T)
    rounding = (2.0**-8 if y.dtype == torch.bfloat16 else 2.0**-24) * (exact.abs() + accumulation)
    assert y.dtype == x.dtype and y.shape == exact.shape
    excess = (y.double() - exact).abs() - (accumulation + rounding)
    worst = divmod(int(excess.argmax()), y.shape[1])
    assert float(excess.max()) <= 0, f"off by more than the rounding bound at {worst}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 45), (33, 100), (64, 128), (5, 4096)])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_pack_round_trip_is_exact(dtype, shape, sparsity):
    weight = pruned(*shape, dtype, sparsity=min(sparsity, 0.999))
    if sparsity == 1.0:
        weight.zero_()
    packed = pack_bitmap(weight)
    assert packed.nnz == int(weight.ne(0).sum())
    assert packed.values.numel() == packed.nnz + VALUE_PAD
    assert packed.bits.shape == (shape[0], -(-shape[1] // 32))
    assert torch.equal(packed.to_dense(), weight)


def test_bytes_per_weight_match_the_format_arithmetic():
    two_four = pack_nm(pruned(256, 4096, torch.bfloat16, nm=(2, 4)), 2, 4)
    assert two_four.nm == (2, 4)
    assert two_four.bytes_per_weight == pytest.approx(0.5 * 2 + 1 / 8, abs=0.003)
    seventy = pack_bitmap(pruned(256, 4096, torch.bfloat16, sparsity=0.7))
    assert seventy.bytes_per_weight == pytest.approx(0.3 * 2 + 1 / 8, abs=0.003)


def test_pack_nm_rejects_a_weight_without_the_pattern():
    with pytest.raises(SeftkitError, match="not 2:4 sparse"):
        pack_nm(pruned(8, 16, torch.float32, sparsity=0.5), 2, 4)


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("operands", OPERANDS, ids=lambda pair: "w{}-x{}".format(*(str(t)[6:] for t in pair)))
@pytest.mark.parametrize("pattern", [0.5, 0.7, 0.95, (2, 4), (1, 4), (4, 8)], ids=str)
def test_kernel_equals_dense_matmul(isa, operands, pattern):
    w_dtype, x_dtype = operands
    module = native()
    for rows, cols in zip((1, 5, 9, 33, 3, 17, 40, 6, 12), WIDTHS, strict=True):
        if isinstance(pattern, tuple) and cols % pattern[1]:
            continue
        kwargs = {"nm": pattern} if isinstance(pattern, tuple) else {"sparsity": pattern}
        weight = pruned(rows, cols, w_dtype, seed=cols, **kwargs)
        packed = pack_bitmap(weight)
        for batch in BATCHES:
            x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch)).to(x_dtype)
            y = module.bitmap_matmul(x, packed.values, packed.bits, packed.row_ptr, cols, int(isa))
            assert_matches_reference(y, x, weight)


def test_the_reference_bound_catches_a_wrong_column():
    weight = pruned(16, 95, torch.bfloat16, sparsity=0.7)
    x = torch.randn(3, 95).to(torch.bfloat16)
    packed = pack_bitmap(weight)
    y = native().bitmap_matmul(x, packed.values, packed.bits, packed.row_ptr, 95, int(kernel_isa()))
    assert_matches_reference(y, x, weight)
    shifted = weight.clone()
    shifted[:, 1:] = weight[:, :-1]  # every value one column late: what an off-by-one expansion would do
    with pytest.raises(AssertionError, match="rounding bound"):
        assert_matches_reference(y, x, shifted)
    dropped = weight.clone()
    dropped[5, dropped[5].nonzero()[0]] = 0  # one kept weight lost
    with pytest.raises(AssertionError, match=r"rounding bound at \(\d, 5\)"):
        assert_matches_reference(y, x, dropped)


def fixed_timer(sparse_ms_by_rows: dict[int, float], dense_ms: float = 1.0):
    calls = []

    def timer(layer, rows, x_dtype):
        calls.append(rows)
        return sparse_ms_by_rows[rows], dense_ms

    return timer, calls


def test_dispatch_buckets_batch_sizes():
    from seftkit.kernels.dispatch import LARGE_ROWS, bucket

    assert [bucket(n) for n in (1, 2, 4, 5, 16, 17, 64, 65, 4096)] == [1, 4, 4, 16, 16, 64, 64, LARGE_ROWS, LARGE_ROWS]


def test_sparse_linear_runs_the_faster_path_per_bucket_and_keeps_dense_only_where_it_won():
    from seftkit.kernels import KernelChoice
    from seftkit.kernels.dispatch import LARGE_ROWS

    # injected timings: the kernel wins at 1 and 4 rows, dense from 16 on
    timer, calls = fixed_timer({1: 0.5, 4: 0.9, 16: 1.5, 64: 3.0, LARGE_ROWS: 9.0})
    choice = KernelChoice(timer)
    linear = torch.nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.mul_(unstructured_mask(linear.weight.abs(), 0.7))
    layers = [SparseLinear.from_linear(linear, choice=choice) for _ in range(2)]
    ran = []
    for layer in layers:
        layer.sparse_forward = (lambda real: lambda flat: ran.append("sparse") or real(flat))(layer.sparse_forward)
        layer.dense_forward = (lambda real: lambda flat: ran.append("dense") or real(flat))(layer.dense_forward)
    for rows in (1, 3):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(layers[0](x), linear(x), rtol=1e-5, atol=1e-5)
    assert ran == ["sparse", "sparse"] and layers[0].dense_copy is None
    x = torch.randn(20, 96)
    torch.testing.assert_close(layers[0](x), linear(x), rtol=1e-5, atol=1e-5)
    assert ran[-1] == "dense" and torch.equal(layers[0].dense_copy, linear.weight.detach())
    layers[1](torch.randn(33, 96))  # same shape, same bucket (64): the cached choice, no new timing
    assert ran[-1] == "dense" and calls == [1, 4, 64]
    assert choice.timings[choice.key(layers[0], 20, torch.float32)] == (3.0, 1.0)


def test_dense_fallback_off_always_runs_the_kernel():
    from seftkit.kernels import KernelChoice

    timer, calls = fixed_timer({1: 5.0})
    sparse = SparseLinear.from_linear(torch.nn.Linear(32, 8), dense_fallback=False, choice=KernelChoice(timer))
    assert sparse.choice is None
    sparse(torch.randn(1, 32))
    assert calls == [] and sparse.dense_copy is None


def test_sparsify_model_passes_the_choice_to_every_layer():
    from seftkit.kernels import KernelChoice

    timer, calls = fixed_timer({4: 2.0})  # dense faster at the 4 rows of this prompt
    choice = KernelChoice(timer)
    model = prune_model(make_tiny_model("llama")[0], sparsity=0.7)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        dense = model(ids).logits
        sparsify_model(model, choice=choice)
        torch.testing.assert_close(model(ids).logits, dense, rtol=1e-5, atol=1e-5)
    swapped = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == 14 and all(m.choice is choice and m.dense_copy is not None for m in swapped)
    assert len(calls) == 4  # one timing per distinct shape (q/o, k/v, gate/up, down), bucket 4
    import copy

    assert all(m.choice is choice for m in copy.deepcopy(model).modules() if isinstance(m, SparseLinear))


def test_rows_split_across_threads_give_the_same_result():
    weight = pruned(300, 96, torch.bfloat16, sparsity=0.7)
    packed = pack_bitmap(weight)
    x = torch.randn(2, 96).to(torch.bfloat16)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            outputs.append(native().bitmap_matmul(x, packed.values, packed.bits, packed.row_ptr, 96,
                                                  int(kernel_isa())))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1])
    assert_matches_reference(outputs[1], x, weight)


def test_fp32_activations_with_bf16_weights_keep_fp32_precision():
    weight = pruned(40, 96, torch.bfloat16, sparsity=0.7)
    packed = pack_bitmap(weight)
    x = torch.randn(3, 96)
    y = native().bitmap_matmul(x, packed.values, packed.bits, packed.row_ptr, 96, int(kernel_isa()))
    assert_matches_reference(y, x, weight)


@pytest.mark.parametrize("isa", [p for p in LEVELS if p.values[0] < Isa.AVX512_BF16])
def test_bf16_outputs_are_the_fp32_sums_rounded_as_torch_rounds(isa):
    # below AVX-512 BF16, bf16 activations are widened exactly and summed as fp32 ones are, so the in-kernel
    # rounding of the bf16 output must be torch's round-to-nearest-even of the same sums, bit for bit
    weight = pruned(70, 95, torch.bfloat16, sparsity=0.7)
    packed = pack_bitmap(weight)
    x = torch.randn(6, 95).to(torch.bfloat16)
    y16 = native().bitmap_matmul(x, packed.values, packed.bits, packed.row_ptr, 95, int(isa))
    y32 = native().bitmap_matmul(x.float(), packed.values, packed.bits, packed.row_ptr, 95, int(isa))
    assert y16.dtype == torch.bfloat16 and y32.dtype == torch.float32
    assert torch.equal(y16, y32.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_aligned_inputs_give_the_contiguous_result(dtype):
    weight = pruned(20, 64, dtype, sparsity=0.7)
    packed = pack_bitmap(weight)
    wide = torch.randn(5, 128).to(dtype)
    strided = wide[:, ::2]  # width 64 (whole words) but not contiguous: must not be read in place
    y = native().bitmap_matmul(strided, packed.values, packed.bits, packed.row_ptr, 64, int(kernel_isa()))
    expected = native().bitmap_matmul(strided.contiguous(), packed.values, packed.bits, packed.row_ptr, 64,
                                      int(kernel_isa()))
    assert torch.equal(y, expected)
    assert_matches_reference(y, strided.contiguous(), weight)


def test_kernel_rejects_mismatched_input_width_and_bad_buffers():
    packed = pack_bitmap(pruned(4, 64, torch.float32, sparsity=0.5))
    with pytest.raises(RuntimeError, match=r"x must be \[batch, 64\]"):
        native().bitmap_matmul(torch.randn(1, 32), packed.values, packed.bits, packed.row_ptr, 64, 0)
    with pytest.raises(RuntimeError, match=r"row_ptr must be int64 \[out\+1\]"):
        native().bitmap_matmul(torch.randn(1, 64), packed.values, packed.bits, packed.row_ptr[:-1], 64, 0)


def test_sparse_linear_rejects_a_wrong_width_before_the_kernel():
    linear = torch.nn.Linear(64, 8)
    sparse = SparseLinear.from_linear(linear, dense_fallback=False)
    with pytest.raises(ValueError, match=r"width 64, got \(2, 32\)"):
        sparse(torch.randn(2, 32))  # reshape(-1, 64) alone would have made it one row


def test_sparse_linear_matches_nn_linear_with_bias_and_leading_dims():
    linear = torch.nn.Linear(72, 24)
    with torch.no_grad():
        linear.weight.mul_(unstructured_mask(linear.weight.abs(), 0.6))
    sparse = SparseLinear.from_linear(linear, dense_fallback=False)
    x = torch.randn(2, 3, 72)
    torch.testing.assert_close(sparse(x), linear(x), rtol=1e-5, atol=1e-5)
    assert "unstructured" in repr(sparse)


def prune_model(model, sparsity=None, nm=None):
    from seftkit.models import linear_weight, target_linears

    with torch.no_grad():
        for module in target_linears(model).values():
            weight = linear_weight(module)
            keep = nm_mask(weight.abs(), *nm) if nm else unstructured_mask(weight.abs(), sparsity)
            weight.mul_(keep)
    return model


class SameMathLinear(torch.nn.Module):
    """The kernels' arithmetic in dense torch: fp32 sums of the layer's own operands, rounded to x's dtype."""

    def __init__(self, linear: torch.nn.Module) -> None:
        super().__init__()
        from seftkit.models import linear_weight

        self.weight = linear_weight(linear).detach().float()
        self.bias = getattr(linear, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.float(), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def same_math_model(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    from seftkit.models import target_linears

    reference = copy.deepcopy(model)
    for name, module in target_linears(reference).items():
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, SameMathLinear(module))
    return reference


def logits_agree(sparse: torch.Tensor, reference: torch.Tensor) -> bool:
    """Within what a different fp32 summation order explains once rounded to bf16 between the layers: one bf16
    ulp of the largest logit (measured: 0 in bf16, 3e-7 relative in fp32, on every ISA level). Zeroing 8 output
    columns of one kernel moves them by 5x this bound (test below)."""
    return float((sparse - reference).abs().max()) <= 2.0**-8 * float(reference.abs().max())


def tiny_llama_logits(dtype, pattern, backend="unstructured", sabotage=False):
    model, _ = make_tiny_model("llama")
    model = prune_model(model, **({"nm": pattern} if isinstance(pattern, tuple) else {"sparsity": pattern}))
    model.to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = same_math_model(model)(ids).logits.float()
        sparsify_model(model, backend=backend, dense_fallback=False)
        swapped = [m for m in model.modules() if isinstance(m, SparseLinear)]
        if sabotage:  # one layer's kernel loses its first 8 output columns
            layer = model.get_submodule("model.layers.1.mlp.down_proj")
            kernel = layer.sparse_forward
            layer.sparse_forward = lambda flat: kernel(flat).index_fill(1, torch.arange(8), 0)
        return model(ids).logits.float(), reference, swapped


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,pattern", [("auto", 0.7), ("unstructured", 0.7), ("nm", (2, 4)), ("auto", (2, 4))])
def test_sparsified_tiny_llama_gives_the_same_math_logits(dtype, backend, pattern):
    sparse, reference, swapped = tiny_llama_logits(dtype, pattern, backend)
    assert len(swapped) == 2 * 7  # two blocks of q, k, v, o, gate, up, down
    assert all((m.nm == (2, 4)) == isinstance(pattern, tuple) for m in swapped)
    if dtype == torch.float32:
        torch.testing.assert_close(sparse, reference, rtol=1e-5, atol=1e-5)
    assert logits_agree(sparse, reference)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_sabotaged_kernel_block_is_caught_by_the_logit_comparison(dtype):
    sparse, reference, _ = tiny_llama_logits(dtype, 0.7, sabotage=True)
    assert not logits_agree(sparse, reference)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_sparsified_gpt2_and_opt_give_the_dense_logits(family):
    from seftkit.models import target_linears

    model = prune_model(make_tiny_model(family)[0], sparsity=0.6)
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    targets = len(target_linears(model))
    with torch.no_grad():
        dense_logits = model(ids).logits
        sparsify_model(model, backend="unstructured", dense_fallback=False)
        assert sum(isinstance(m, SparseLinear) for m in model.modules()) == targets > 0
        torch.testing.assert_close(model(ids).logits, dense_logits, rtol=1e-4, atol=1e-4)


def test_auto_leaves_fp16_layers_dense():
    import seftkit

    assert seftkit.sparsify_model is sparsify_model
    model = prune_model(make_tiny_model("llama")[0], sparsity=0.7).half()
    sparsify_model(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


def test_sparsified_model_generates_the_same_greedy_tokens():
    model, _ = make_tiny_model("llama")
    model = prune_model(model, sparsity=0.7)
    prompt = torch.tensor([[1, 2, 3, 4]])
    dense = model.generate(prompt, max_new_tokens=8, do_sample=False)
    sparsify_model(model, dense_fallback=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), dense)


def test_auto_keeps_dense_layers_dense_and_nm_refuses_unstructured_layers():
    model, _ = make_tiny_model("llama")
    sparsify_model(model, backend="auto")
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    prune_model(model, sparsity=0.5)
    with pytest.raises(SeftkitError, match="is not 2:4 sparse"):
        sparsify_model(model, backend="nm")
    with pytest.raises(SeftkitError, match="unknown backend"):
        sparsify_model(model, backend="fast")


def test_build_failure_falls_back_to_dense_with_a_warning(monkeypatch):
    def broken_compile():
        raise RuntimeError("Error building extension 'seftkit_kernels'")

    monkeypatch.setattr(build, "_compile", broken_compile)
    build.native.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native sparse kernels unavailable"):
            assert build.native() is None
        model = prune_model(make_tiny_model("llama")[0], sparsity=0.7)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert sparsify_model(model) is model
        assert any("stays dense" in str(w.message) for w in caught)
        assert not any(isinstance(m, SparseLinear) for m in model.modules())
        report = bench_layers([(16, 32)], SparsityPattern(sparsity=0.5), [1], torch.float32, rounds=1,
                              streaming=False, progress=False)
        assert "sparse" in report.skipped and "auto" in report.skipped
        assert [set(r.timings) for r in report.results] == [{"dense-bf16", "dense-fp32"}]
        assert report.results[0].speedup is None and report.results[0].fastest_dense in ("dense-bf16", "dense-fp32")
        assert "skipped sparse: native kernels could not be built" in "\n".join(format_layers(report))
    finally:
        build.native.cache_clear()


def test_missing_cpu_feature_falls_back_to_a_lower_path(monkeypatch):
    real = native()
    avx2_only = SimpleNamespace(cpu_isa=lambda: int(Isa.AVX2), bitmap_matmul=real.bitmap_matmul)
    monkeypatch.setattr(build, "native", lambda: avx2_only)
    with pytest.warns(RuntimeWarning, match="lacks avx512_bf16; using avx2"):
        assert kernel_isa("avx512-bf16") == Isa.AVX2
    monkeypatch.setenv(build.ISA_ENV, "portable")
    assert kernel_isa() == Isa.PORTABLE
    linear = torch.nn.Linear(40, 8, bias=False)
    with torch.no_grad():
        linear.weight.mul_(unstructured_mask(linear.weight.abs(), 0.7))
    sparse = SparseLinear.from_linear(linear, dense_fallback=False)
    assert sparse.isa == Isa.PORTABLE
    x = torch.randn(1, 40)
    torch.testing.assert_close(sparse(x), linear(x), rtol=1e-5, atol=1e-5)


def test_unknown_isa_name_is_a_user_error():
    with pytest.raises(SeftkitError, match="unknown kernel ISA 'sse9'"):
        build.parse_isa("sse9")


def test_cuda24_explains_unfit_weights():
    assert "dtype" in cuda24.weight_unfit_reason(torch.zeros(64, 64))
    assert "shape 30x64" in cuda24.weight_unfit_reason(torch.zeros(30, 64, dtype=torch.bfloat16))
    assert cuda24.weight_unfit_reason(pruned(64, 64, torch.bfloat16, sparsity=0.5)) == "not 2:4 sparse"
    assert cuda24.weight_unfit_reason(pruned(64, 64, torch.bfloat16, nm=(2, 4))) is None


@pytest.mark.skipif(cuda24.unavailable_reason() is None, reason="CUDA 2:4 is available here")
def test_cuda24_backend_without_cuda_warns_and_stays_dense():
    model = prune_model(make_tiny_model("llama")[0], nm=(2, 4))
    with pytest.warns(RuntimeWarning, match="cuda24 backend skipped"):
        sparsify_model(model, backend="cuda24")
    assert all(not getattr(p, "is_sparse", False) for p in model.parameters())


@pytest.mark.skipif(cuda24.unavailable_reason() is not None, reason=str(cuda24.unavailable_reason()))
def test_cuda24_linear_matches_dense():
    weight = pruned(128, 128, torch.float16, nm=(2, 4)).cuda()
    x = torch.randn(16, 128, dtype=torch.float16, device="cuda")
    torch.testing.assert_close(F.linear(x, cuda24.to_cuda24(weight)), F.linear(x, weight), rtol=1e-2, atol=1e-2)


def test_streamed_weight_copies_are_distinct_memory():
    from seftkit.bench.layers import _copies, cpu_backends

    weight = pruned(64, 96, torch.bfloat16, sparsity=0.7)
    for backend in cpu_backends(("dense-bf16", "dense-fp32", "sparse", "auto"), torch.bfloat16):
        copies = _copies(backend, weight, stream_bytes=64 * 96 * 4 * 3)
        storage = {(c if isinstance(c, torch.Tensor) else c.values).data_ptr() for c in copies}
        assert len(copies) >= 2 and len(storage) == len(copies), backend.name  # else the "stream" is one hot copy
        torch.testing.assert_close(backend.call(torch.ones(1, 96, dtype=backend.x_dtype), copies[-1]).float(),
                                   backend.call(torch.ones(1, 96, dtype=backend.x_dtype), copies[0]).float())


def run_bench(*args):
    from click.testing import CliRunner

    from seftkit.cli.main import cli

    return CliRunner().invoke(cli, ["bench", *map(str, args)])


def test_bench_command_on_a_model_reports_layers_and_decode(llama_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench(llama_dir, "--sparsity", 0.7, "--dtype", "fp32", "--batch", "1,3", "--rounds", 1,
                       "--tokens", 4, "--threads", "1,1", "--no-stream", "--json", out)
    assert result.exit_code == 0, result.output
    runs = json.loads(out.read_text())["runs"]
    assert [run["threads"] for run in runs] == [1]  # repeated counts run once
    layers, decode = runs[0]["layers"], runs[0]["decode"]
    # tiny llama: q/o 32x32, k/v 16x32, gate/up 64x32, down 32x64 -> four shapes, two batches each
    assert [(tuple(r["shape"]), r["batch"]) for r in layers["results"]] == [
        (shape, batch) for shape in ((32, 32), (16, 32), (64, 32), (32, 64)) for batch in (1, 3)]
    for r in layers["results"]:
        t = r["timings"]
        assert set(t) == {"dense-bf16", "dense-fp32", "sparse", "auto"}
        assert r["fastest_dense"] == min(("dense-bf16", "dense-fp32"), key=lambda n: t[n]["min_ms"])
        assert r["speedup"] == pytest.approx(t[r["fastest_dense"]]["min_ms"] / t["sparse"]["min_ms"])
        assert r["speedup_same_dtype"] == pytest.approx(t["dense-fp32"]["min_ms"] / t["sparse"]["min_ms"])
        assert r["auto_vs_dense"] == pytest.approx(t["auto"]["min_ms"] / t["dense-fp32"]["min_ms"])
        assert t["sparse"]["gbps"] == pytest.approx(t["sparse"]["bytes_per_weight"] * r["shape"][0] * r["shape"][1]
                                                    / t["sparse"]["min_ms"] / 1e6)
    assert layers["machine"]["threads"] == 1 and layers["machine"]["stream_bytes"] == 0
    assert layers["machine"]["stream_read_gbps"] is None
    totals = layers["totals"]
    assert [t["batch"] for t in totals] == [1, 3]
    by_shape = {(tuple(r["shape"]), r["batch"]): r["timings"] for r in layers["results"]}
    counts = {(32, 32): 4, (16, 32): 4, (64, 32): 4, (32, 64): 2}  # two blocks
    expected = {name: sum(n * by_shape[shape, 1][name]["min_ms"] for shape, n in counts.items())
                for name in ("sparse", "dense-bf16", "dense-fp32")}
    assert totals[0]["sparse_ms"] == pytest.approx(expected["sparse"])
    assert totals[0]["dense_ms"] == pytest.approx(min(expected["dense-bf16"], expected["dense-fp32"]))
    assert decode["sparse_layers"] == decode["target_layers"] == 14 and decode["threads"] == 1
    assert set(decode["dense_tokens_per_s"]) == {"bf16", "fp32"} and decode["dtype"] == "fp32"
    fastest = max(decode["dense_tokens_per_s"], key=decode["dense_tokens_per_s"].get)
    assert decode["fastest_dense"] == fastest
    assert decode["speedup"] == pytest.approx(decode["sparse_tokens_per_s"] / decode["dense_tokens_per_s"][fastest])
    assert decode["identical_tokens"] == decode["compared_tokens"] == 4
    assert decode["prompt_logits_max_diff"] < 1e-3
    assert "decode" in result.stdout and "tok/s" in result.stdout and "ceiling" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "0.5", "--nm", "2:4"], "give either --sparsity or --nm, not both"),
    (["--nm", "2:4", "--batch", "1,x"], "--batch takes comma-separated positive integers"),
    (["--nm", "2:4", "--batch", "0"], "--batch takes comma-separated positive integers"),
    (["--nm", "2:4", "--threads", "1,many"], "--threads takes comma-separated positive integers"),
    (["--sparsity", "0.5", "--backends", "dense-bf16,warp"], "unknown backend 'warp'"),
    (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
])
def test_bench_bad_input_is_one_line_and_exit_2(args, message):
    result = run_bench(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("seftkit: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
