"""The sparsity core: patterns, target selection on every family, masks, zero statistics, raw-bit zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, make_tiny_model

from seftkit.errors import SeftkitError
from seftkit.sparsity.masks import nm_mask, nm_valid, pattern_mask, smallest_mask, unstructured_mask
from seftkit.sparsity.pattern import SparsityPattern, check_sparsity, parse_nm, parse_pattern
from seftkit.sparsity.scanner import DTYPES, row_blocks, zero_mask
from seftkit.sparsity.stats import group_zero_counts, summarize, zero_stats
from seftkit.sparsity.targets import TargetRule, layer_index

# --- patterns -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "nm"), [("2:4", (2, 4)), (" 1 : 4 ", (1, 4)), ("4:8", (4, 8))])
def test_parse_nm(text, nm):
    assert parse_nm(text) == nm


@pytest.mark.parametrize(("text", "message"), [
    ("2-4", "expected two integers like 2:4"), ("", "expected two integers"), ("a:b", "expected two integers"),
    ("2:4:8", "expected two integers"), ("4:2", "need 0 < N < M"), ("0:4", "need 0 < N < M"),
    ("4:4", "need 0 < N < M"),
])
def test_parse_nm_errors(text, message):
    with pytest.raises(SeftkitError, match=message):
        parse_nm(text)


def test_parse_pattern():
    assert parse_pattern(nm="2:4") == SparsityPattern(n=2, m=4)
    assert parse_pattern(sparsity=0.5).fraction == 0.5 and not parse_pattern(sparsity=0.5).is_nm
    assert parse_pattern(nm="1:4").fraction == 0.25
    assert parse_pattern(nm="2:4").describe() == "2:4" and parse_pattern(0.6).describe() == "60% unstructured"
    with pytest.raises(SeftkitError, match="either --sparsity or --nm, not both"):
        parse_pattern(0.5, "2:4")
    with pytest.raises(SeftkitError, match="give --sparsity S or --nm N:M"):
        parse_pattern()
    for bad in (1.0, -0.1, float("nan"), 2.0):
        with pytest.raises(SeftkitError, match=r"sparsity must be in \[0, 1\)"):
            check_sparsity(bad)
    assert check_sparsity(0.0) == 0.0


def test_check_width():
    SparsityPattern(n=2, m=4).check_width("w", 64)
    SparsityPattern(sparsity=0.5).check_width("w", 63)
    with pytest.raises(SeftkitError, match="does not fit w: input width 30 is not a multiple of 4"):
        SparsityPattern(n=2, m=4).check_width("w", 30)


# --- target selection ---------------------------------------------------------------------------------------

# The linears of one decoder block, per family (suffixes of the parameter names).
BLOCK_LINEARS = {
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
}
BLOCK_LINEARS["mistral"] = BLOCK_LINEARS["qwen2"] = BLOCK_LINEARS["llama"]
PREFIX = {"gpt2": "transformer.h", "opt": "model.decoder.layers"}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_rule_selects_decoder_linears(family):
    model, _ = make_tiny_model(family)
    params = {name: p.ndim for name, p in model.named_parameters()}
    selected = {name for name, ndim in params.items() if TargetRule().matches(name, ndim)}
    prefix = PREFIX.get(family, "model.layers")
    assert selected == {f"{prefix}.{i}.{lin}.weight" for i in (0, 1) for lin in BLOCK_LINEARS[family]}
    embeddings = [n for n in params if ("embed" in n or "wte" in n) and params[n] == 2]
    assert embeddings and not selected & set(embeddings)


def test_rule_include_exclude():
    rule = TargetRule(include=r"mlp", exclude=r"down")
    assert rule.matches("model.layers.0.mlp.up_proj.weight", 2)
    assert not rule.matches("model.layers.0.mlp.down_proj.weight", 2)
    assert not rule.matches("model.layers.0.self_attn.q_proj.weight", 2)
    assert not rule.matches("model.layers.0.mlp.up_proj.bias", 1)
    assert not rule.matches("model.layers.0.mlp.up_proj.weight", 1)
    # include replaces the default rule: lm_head can be targeted on purpose
    assert TargetRule(include="lm_head").matches("lm_head.weight", 2)
    assert not TargetRule().matches("lm_head.weight", 2)
    assert not TargetRule(exclude="q_proj").matches("model.layers.3.self_attn.q_proj.weight", 2)
    assert TargetRule(exclude="q_proj").matches("model.layers.3.self_attn.k_proj.weight", 2)
    for flag, kwargs in (("--include", {"include": "("}), ("--exclude", {"exclude": "[a-"})):
        with pytest.raises(SeftkitError, match=f"bad {flag} regular expression"):
            TargetRule(**kwargs)


def test_layer_index():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("lm_head.weight") is None


# --- masks --------------------------------------------------------------------------------------------------


def test_unstructured_mask_exact_counts():
    scores = torch.rand(10, 12, generator=torch.Generator().manual_seed(0))
    for sparsity in (0.0, 0.25, 0.5, 0.7, 0.99):
        keep = unstructured_mask(scores, sparsity)
        assert int((~keep).sum()) == int(120 * sparsity)
        dropped, kept = scores[~keep], scores[keep]
        if dropped.numel():
            assert dropped.max() <= kept.min()
        per_row = unstructured_mask(scores, sparsity, per_row=True)
        assert ((~per_row).sum(dim=1) == int(12 * sparsity)).all()


def test_masks_break_ties_by_position():
    scores = torch.ones(4, 8)
    keep = unstructured_mask(scores, 0.5)
    assert torch.equal(keep.flatten(), torch.arange(32) >= 16)
    assert torch.equal(unstructured_mask(scores, 0.25, per_row=True), torch.arange(8).expand(4, 8) >= 2)
    assert torch.equal(nm_mask(scores, 2, 4), torch.tensor([False, False, True, True] * 2).expand(4, 8))
    assert torch.equal(smallest_mask(scores, 3), unstructured_mask(scores, 3 / 32))


def test_nm_mask_and_validity():
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(1))
    for n, m in ((2, 4), (1, 4), (4, 8)):
        keep = nm_mask(scores, n, m)
        assert ((~keep).reshape(6, -1, m).sum(dim=2) == n).all()
        groups, kept = scores.reshape(6, -1, m), keep.reshape(6, -1, m)
        dropped_max = groups.masked_fill(kept, -1.0).max(dim=2).values
        kept_min = groups.masked_fill(~kept, 2.0).min(dim=2).values
        assert (dropped_max <= kept_min).all()  # the n smallest of each group go
        weight = scores * keep
        assert nm_valid(weight, n, m)
        weight[3, m : 2 * m] = 5.0  # refill group (3, 1)
        assert not nm_valid(weight, n, m)
    assert not nm_valid(torch.zeros(2, 6), 2, 4)  # width 6 has no whole groups of 4
    with pytest.raises(SeftkitError, match="multiple of 4"):
        nm_mask(torch.rand(2, 6), 2, 4)
    assert torch.equal(pattern_mask(scores, SparsityPattern(n=2, m=4)), nm_mask(scores, 2, 4))
    assert torch.equal(pattern_mask(scores, SparsityPattern(sparsity=0.5), per_row=True),
                       unstructured_mask(scores, 0.5, per_row=True))


# --- zero statistics ----------------------------------------------------------------------------------------


def test_zero_stats_nm_and_transposed():
    zero = np.zeros((4, 8), dtype=bool)  # [out, in]
    zero[:, ::2] = True  # 2 zeros in every group of 4
    assert zero_stats("w", zero, SparsityPattern(n=2, m=4)).nm_ok
    zero[2, 4] = False
    zero[1, 0] = False
    stats = zero_stats("w", zero, SparsityPattern(n=2, m=4))
    assert (stats.nm_ok, stats.nm_first_violation, stats.nm_violations) == (False, (1, 0), 2)
    assert (stats.zeros, stats.numel, stats.sparsity) == (14, 32, 14 / 32)
    t_stats = zero_stats("w", zero.T.copy(), SparsityPattern(n=2, m=4), transposed=True)
    assert (t_stats.nm_first_violation, t_stats.nm_violations) == ((1, 0), 2)
    assert zero_stats("w", zero, None).nm_ok is None


def test_group_zero_counts_matches_sum():
    zero = np.random.default_rng(0).random((12, 24)) < 0.5
    for m in (2, 4, 8):
        expected = zero.reshape(12, -1, m).sum(axis=2)
        assert np.array_equal(group_zero_counts(zero, m), expected)
        assert np.array_equal(group_zero_counts(zero.T.copy(), m, transposed=True), expected)


def test_summarize_per_layer():
    stats = [zero_stats("model.layers.0.a.weight", np.eye(4, dtype=bool)),
             zero_stats("model.layers.0.b.weight", np.zeros((2, 4), dtype=bool)),
             zero_stats("model.layers.1.a.weight", np.ones((2, 2), dtype=bool))]
    summary = summarize(stats)
    assert (summary.numel, summary.zeros) == (28, 8)
    assert summary.per_layer == {0: {"numel": 24, "zeros": 4, "sparsity": 4 / 24},
                                 1: {"numel": 4, "zeros": 4, "sparsity": 1.0}}


# --- raw-bit zeros ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "raw", "zero"), [
    ("F32", [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x7FC00000], [1, 1, 0, 0, 0]),
    ("BF16", [0x0000, 0x8000, 0x0001, 0x3F80, 0xFFFF], [1, 1, 0, 0, 0]),
    ("F16", [0x0000, 0x8000, 0x0400, 0x8001], [1, 1, 0, 0]),
    ("F8_E4M3", [0x00, 0x80, 0x01, 0x7F], [1, 1, 0, 0]),
    ("F8_E5M2", [0x00, 0x80, 0x81, 0xFF], [1, 1, 0, 0]),
    ("I8", [0x00, 0x80, 0x01, 0xFF], [1, 0, 0, 0]),  # -128 is not zero
    ("I32", [0, 0x80000000, 1], [1, 0, 0]),
    ("BOOL", [0, 1], [1, 0]),
])
def test_zero_mask_on_bits(dtype, raw, zero):
    assert zero_mask(np.array(raw, dtype=DTYPES[dtype].raw), dtype).tolist() == [bool(z) for z in zero]


def test_row_blocks_cover_rows_in_multiples():
    blocks = list(row_blocks(10, 3, multiple=4, budget=12))
    assert [(b.start, b.stop) for b in blocks] == [(0, 4), (4, 8), (8, 10)]
    assert [(b.start, b.stop) for b in row_blocks(5, 1000, budget=10)] == [(i, i + 1) for i in range(5)]
