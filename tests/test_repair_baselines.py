"""Every repair method in the shared loop: equal budgets, exact sparsity, N:M, merge parity, frozen zeros."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import make_tiny_model

from seftkit.models import linear_weight, target_linears
from seftkit.prune import prune_model
from seftkit.repair import RepairConfig, repair_model
from seftkit.repair.baselines import MaskedLora, lora_rank, top_per_row, uniform_row_nnz
from seftkit.repair.registry import REPAIR_METHODS
from seftkit.sparsity.masks import nm_valid
from seftkit.sparsity.pattern import parse_pattern

ALL_METHODS = ("seft", "seft-no-revive", "lora-prune", "masked-lora", "static")
FAMILIES = ("llama", "qwen2", "gpt2", "opt")


@functools.cache
def _pruned(family: str, sparsity: float | None, nm: str | None):
    model, tokenizer = make_tiny_model(family)
    prune_model(model, tokenizer, "magnitude", parse_pattern(sparsity if nm is None else None, nm), progress=False)
    return model, tokenizer


def pruned_tiny(family: str = "llama", sparsity: float | None = 0.5, nm: str | None = None):
    """A fresh copy of a magnitude-pruned tiny model (built once per pattern: tokenizer training is slow)."""
    model, tokenizer = _pruned(family, sparsity, nm)
    return copy.deepcopy(model), tokenizer


def nnz(model) -> dict[str, int]:
    return {name: int(torch.count_nonzero(linear_weight(m))) for name, m in target_linears(model).items()}


def small_config(method: str, data, **overrides) -> RepairConfig:
    settings = dict(method=method, data=str(data), steps=6, batch_size=2, seqlen=32, lr=1e-2,
                    lora_rank_equivalent=2, update_interval=3, accumulation_steps=2)
    return RepairConfig(**{**settings, **overrides})


def test_registry_holds_every_cli_method():
    assert set(REPAIR_METHODS) == set(ALL_METHODS)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_trainable_budget_is_a_rank_r_lora_on_every_layer(method, tiny_text_file):
    model, tokenizer = pruned_tiny("llama")
    expected = sum(3 * sum(linear_weight(m).shape) for m in target_linears(model).values())
    report = repair_model(model, tokenizer, small_config(method, tiny_text_file, lora_rank_equivalent=3, steps=1),
                          progress=False)
    if method == "static":  # every active weight trains: the memory ceiling, not a budget
        assert report.trainable_params == sum(nnz(model).values())
    else:
        assert report.trainable_params == expected


def test_delta_density_converts_to_the_closest_equal_budget_rank():
    model, _ = make_tiny_model("llama")
    targets = target_linears(model)
    # two blocks of q 32x32, k 16x32, v 16x32, o 32x32, gate/up 64x32, down 32x64: 18432 weights, in+out = 1024
    rank = lora_rank(RepairConfig(delta_density=0.3, lora_rank_equivalent=None), targets)
    assert rank == 5  # 0.3 * 18432 / 1024 = 5.4
    assert lora_rank(RepairConfig(delta_density=1e-6, lora_rank_equivalent=None), targets) == 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_layer_keeps_its_input_nnz(family, method, tiny_text_file):
    model, tokenizer = pruned_tiny(family)
    before = nnz(model)
    report = repair_model(model, tokenizer, small_config(method, tiny_text_file), progress=False)
    after = nnz(model)
    assert type(model.get_submodule(next(iter(before)))).__name__ in ("Linear", "Conv1D")  # plain modules again
    assert report.loss_curve[-1][1] < report.loss_curve[0][1]
    if method == "seft":
        assert report.method_summary["revived_weights"] > 0  # so the exact count below covers revival
    assert {name: layer.nnz_after for name, layer in report.layers.items()} == after
    assert after == before


@pytest.mark.parametrize("method", ALL_METHODS)
def test_nm_pattern_survives_repair(method, tiny_text_file):
    model, tokenizer = pruned_tiny("llama", nm="2:4")
    before = nnz(model)
    repair_model(model, tokenizer, small_config(method, tiny_text_file, nm="2:4"), progress=False)
    assert all(nm_valid(linear_weight(m), 2, 4) for m in target_linears(model).values())
    assert nnz(model) == before


def test_nm_requires_an_nm_input(tiny_text_file):
    model, tokenizer = pruned_tiny("llama", sparsity=0.5)
    from seftkit.errors import SeftkitError

    with pytest.raises(SeftkitError, match="not 2:4 sparse"):
        repair_model(model, tokenizer, small_config("static", tiny_text_file, nm="2:4"), progress=False)


def test_masked_lora_merge_equals_its_forward(tiny_text_file):
    model, tokenizer = pruned_tiny("llama")
    config = small_config("masked-lora", tiny_text_file)
    method = MaskedLora(config)
    method.attach(model, target_linears(model))
    with torch.no_grad():  # a non-trivial update (B = 0 at init would make the test vacuous)
        for p in method.trainable_parameters():
            p.normal_(0, 0.5)
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        wrapped = model(ids).logits
        method.merge()
        merged = model(ids).logits
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert (wrapped - merged).abs().max() < 1e-4
    assert wrapped.abs().max() > 0


def test_static_never_changes_pruned_positions(tiny_text_file):
    model, tokenizer = pruned_tiny("opt")
    start = {name: linear_weight(m).detach().clone() for name, m in target_linears(model).items()}
    repair_model(model, tokenizer, small_config("static", tiny_text_file, weight_decay=0.1), progress=False)
    changed = 0
    for name, module in target_linears(model).items():
        weight = linear_weight(module)
        assert torch.equal(weight[start[name] == 0], torch.zeros_like(weight[start[name] == 0]))
        changed += int((weight != start[name]).sum())
    assert changed > 0.9 * sum(int((w != 0).sum()) for w in start.values())


def test_reprune_keeps_per_row_counts_when_rows_were_uniform():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 5.0, 1.0]])
    assert top_per_row(scores, 2).tolist() == [[True, False, True, False], [False, True, True, False]]
    assert uniform_row_nnz(torch.tensor([[True, False], [False, True]])) == 1
    assert uniform_row_nnz(torch.tensor([[True, True], [False, True]])) is None
