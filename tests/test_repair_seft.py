"""SEFT end to end on tiny pruned models, driven by a plain training loop (the interface the trainer uses)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from seftkit.errors import SeftkitError
from seftkit.models import is_linear, linear_weight, target_linears
from seftkit.repair.config import RepairConfig
from seftkit.repair.delta import SparseDeltaLinear
from seftkit.repair.evolution import candidate_count
from seftkit.repair.registry import build_method
from seftkit.repair.seft import SeftMethod, delta_budget
from seftkit.sparsity.masks import nm_mask, nm_valid, unstructured_mask

STEPS = 12  # boundaries after steps 3 and 7 (none after the last step, 11)


def _config(**overrides) -> RepairConfig:
    base = dict(steps=STEPS, update_interval=4, accumulation_steps=2, drop_rate=0.5, drop_schedule="constant",
                lora_rank_equivalent=2, lr=1e-2, seed=0, init="grad")
    return RepairConfig(**{**base, **overrides})


def _pruned_model(family: str = "llama", nm: tuple[int, int] | None = None):
    """A tiny model pruned by magnitude (50% unstructured, or N:M), and its starting keep-masks."""
    model, tokenizer = make_tiny_model(family)
    masks = {}
    with torch.no_grad():
        for name, module in target_linears(model).items():
            weight = linear_weight(module)
            keep = nm_mask(weight.abs(), *nm) if nm else unstructured_mask(weight.abs(), 0.5)
            weight.mul_(keep)
            masks[name] = keep.clone()
    text = "Sparse models keep most weights at zero. Pruning removes weights; repair fine-tunes the rest. " * 3
    batch = tokenizer([text, text[::-1]], return_tensors="pt", truncation=True, max_length=48)["input_ids"]
    return model, masks, batch


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


@dataclass
class Run:
    model: nn.Module
    method: SeftMethod
    optimizer: torch.optim.Optimizer
    masks: dict[str, torch.Tensor]
    batch: torch.Tensor
    losses: list[float] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    step: int = 0


def _start(config: RepairConfig, family: str = "llama", nm: tuple[int, int] | None = None, init: bool = True) -> Run:
    model, masks, batch = _pruned_model(family, nm)
    method = build_method(config)
    method.attach(model, target_linears(model))
    optimizer = method.make_optimizer(config.lr, config.weight_decay)
    model.train()
    if init:
        for _ in range(method.init_passes()):
            method.before_backward(0)
            _loss(model, batch).backward()
        method.finish_init()
        model.zero_grad(set_to_none=True)
    return Run(model, method, optimizer, masks, batch)


def _train(run: Run, until: int, check: bool = True) -> Run:
    """Train to step ``until``; with ``check``, the exact-topology invariants after every boundary."""
    while run.step < until:
        run.method.before_backward(run.step)
        loss = _loss(run.model, run.batch)
        loss.backward()
        run.optimizer.step()
        event = run.method.after_optimizer_step(run.step, run.optimizer)
        run.optimizer.zero_grad(set_to_none=True)
        run.losses.append(loss.item())
        if event is not None:
            run.events.append(event)
            if check:
                _check_invariants(run)
        run.step += 1
    return run


def _topology(run: Run) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return {layer.name: (layer.module.indices.clone(), layer.module.active.clone(),
                         layer.module.values.detach().clone()) for layer in run.method.layers}


def _check_invariants(run: Run) -> None:
    for layer in run.method.layers:
        indices = layer.module.indices.long()
        assert indices.numel() == layer.k == indices.unique().numel()
        assert int(layer.module.active.sum()) == layer.target_nnz == int(run.masks[layer.name].sum())
        assert layer.module.active.view(-1)[indices].all()
        assert int((layer.module.weight[~layer.module.active] != 0).sum()) == 0
        # no active place holds nothing: a revived weight (base 0) always has its slot, so the merge is exact
        revived = layer.module.active & (layer.module.weight == 0)
        assert bool(revived.view(-1)[indices].sum() == revived.sum())
        if run.method.config.eviction == "row":  # every output row keeps its nnz
            assert torch.equal(layer.module.active.sum(1), run.masks[layer.name].sum(1))


@pytest.fixture(scope="module")
def revive_run() -> Run:
    run = _train(_start(_config()), STEPS)
    _check_invariants(run)
    run.topology = _topology(run)
    run.summary_before_merge = run.method.summary()
    with torch.no_grad():
        run.loss_before_merge = _loss(run.model, run.batch).item()
        run.method.merge()
        run.loss_after_merge = _loss(run.model, run.batch).item()
    return run


def test_revive_run_learns_and_evolves(revive_run):
    run = revive_run
    assert run.losses[-1] < run.losses[0] - 0.1  # a tiny random model: the delta alone moves it a little
    assert [event["step"] for event in run.events] == [3, 7]
    total_k = sum(layer.k for layer in run.method.layers)
    for event in run.events:
        assert event["p"] == 0.5
        assert event["dropped"] == event["grown"] == sum(int(0.5 * layer.k) for layer in run.method.layers)
    assert sum(event["revived"] for event in run.events) > 0
    assert sum(event["emptied"] for event in run.events) > 0  # dead revivals are reclaimed as free places
    assert run.method.init_event["grown"] == total_k and run.method.init_event["regrown"] == 0


def test_merge_keeps_exact_nnz_and_revives_pruned_weights(revive_run):
    run = revive_run
    assert run.loss_after_merge == pytest.approx(run.loss_before_merge, abs=1e-5)
    assert run.loss_after_merge < run.losses[0] - 0.1
    revived = 0
    for name, keep in run.masks.items():
        module = run.model.get_submodule(name)
        assert is_linear(module) and not isinstance(module, SparseDeltaLinear)
        weight = linear_weight(module)
        assert int((weight != 0).sum()) == int(keep.sum())
        revived += int(((weight != 0) & ~keep).sum())
    assert revived > 0
    summary = run.method.summary()
    assert summary["revived_weights"] == revived
    assert summary["revived_weights"] == run.summary_before_merge["revived_weights"]
    assert summary["trainable"] == run.method.trainable_count() == sum(summary["layers"][n]["k"] for n in run.masks)
    assert all(v["nnz_after"] == v["nnz_before"] == int(run.masks[n].sum()) for n, v in summary["layers"].items())
    assert not any(isinstance(m, SparseDeltaLinear) for m in run.model.modules())
    assert all(p.requires_grad for p in run.model.parameters())


def test_no_revive_stays_inside_the_pruned_mask():
    run = _train(_start(_config(method="seft-no-revive")), STEPS)
    _check_invariants(run)
    assert all(event["revived"] == 0 and event["removed_by_sensitivity"] == 0 for event in run.events)
    for layer in run.method.layers:
        assert torch.equal(layer.module.active, run.masks[layer.name])
    assert run.losses[-1] < run.losses[0] - 0.1
    run.method.merge()
    for name, keep in run.masks.items():
        weight = linear_weight(run.model.get_submodule(name))
        assert int((weight != 0).sum()) == int(keep.sum()) and not bool((weight[~keep] != 0).any())
    assert run.method.summary()["revived_weights"] == 0


def test_grad_active_init_picks_inside_the_active_set_then_revives_at_boundaries():
    run = _start(_config(init="grad-active"))
    init = run.method.init_event
    assert init["grown"] == sum(layer.k for layer in run.method.layers) and init["revived"] == 0
    for layer in run.method.layers:
        assert torch.equal(layer.module.active, run.masks[layer.name])  # nothing revived or removed yet
        assert bool(run.masks[layer.name].view(-1)[layer.module.indices.long()].all())
    run = _train(run, STEPS)
    _check_invariants(run)
    assert sum(event["revived"] for event in run.events) > 0  # later updates still bring pruned weights back


def test_same_seed_gives_bit_identical_topology(revive_run):
    again = _train(_start(_config()), STEPS)
    for name, (indices, active, values) in _topology(again).items():
        want = revive_run.topology[name]
        assert torch.equal(indices, want[0]) and torch.equal(active, want[1])
        torch.testing.assert_close(values, want[2])


def test_resume_mid_window_continues_identically(revive_run):
    first = _train(_start(_config()), 7)  # stop after step 6, the first pass of the window of boundary 7
    assert any(layer.grow is not None for layer in first.method.layers)
    state = copy.deepcopy(first.method.state_dict())
    values = [p.detach().clone() for p in first.method.trainable_parameters()]
    optimizer_state = copy.deepcopy(first.optimizer.state_dict())

    resumed = _start(_config(), init=False)
    resumed.method.load_state_dict(state)
    with torch.no_grad():
        for param, value in zip(resumed.method.trainable_parameters(), values, strict=True):
            param.copy_(value)
    resumed.optimizer.load_state_dict(optimizer_state)
    resumed.step = 7
    _train(resumed, STEPS)
    assert [event["step"] for event in resumed.events] == [7]
    for name, (indices, active, values) in _topology(resumed).items():
        want = revive_run.topology[name]
        assert torch.equal(indices, want[0]) and torch.equal(active, want[1])
        torch.testing.assert_close(values, want[2])


def test_nm_mode_on_gpt2_conv1d_keeps_the_pattern():
    run = _train(_start(_config(nm="2:4"), family="gpt2", nm=(2, 4)), STEPS)
    _check_invariants(run)
    assert not run.method.revive and run.events
    run.method.merge()
    for name, keep in run.masks.items():
        weight = linear_weight(run.model.get_submodule(name))
        assert nm_valid(weight, 2, 4) and not bool((weight[~keep] != 0).any())
        assert int((weight != 0).sum()) == int(keep.sum())


def test_nm_mode_refuses_a_model_that_is_not_nm():
    model, _, _ = _pruned_model()
    with pytest.raises(SeftkitError, match="is not 2:4 sparse"):
        SeftMethod(_config(nm="2:4")).attach(model, target_linears(model))


def test_random_init_starts_inside_the_active_set_without_probes():
    run = _start(_config(init="random"))
    assert run.method.init_passes() == 0
    for layer in run.method.layers:
        assert layer.module.active.view(-1)[layer.module.indices.long()].all()
        assert layer.module.indices.long().unique().numel() == layer.k
    again = _start(_config(init="random"))
    for layer, same in zip(run.method.layers, again.method.layers, strict=True):
        assert torch.equal(layer.module.indices, same.module.indices)


def test_budget_from_density_or_rank_and_capped_by_the_active_set():
    assert delta_budget(_config(), 64, 32) == 2 * 96
    assert delta_budget(_config(delta_density=0.01, lora_rank_equivalent=None), 64, 32) == round(0.01 * 64 * 32)
    assert delta_budget(RepairConfig(), 64, 32) == 8 * 96  # neither given: rank 8
    assert delta_budget(RepairConfig(delta_density=0.01), 64, 32) == round(0.01 * 64 * 32)
    run = _start(_config(lora_rank_equivalent=64), init=False)
    assert all(layer.k == layer.target_nnz for layer in run.method.layers)


def test_only_o_k_state_survives_a_step():
    run = _train(_start(_config()), 3)  # step 2 sits in a window, so candidates are held
    for layer in run.method.layers:
        module = layer.module
        numel = module.weight.numel()
        big = [t for t in (*module.parameters(), *module.buffers()) if t.numel() >= numel]
        assert [str(t.dtype) for t in big] == ["torch.float32"]  # the frozen weight; the active mask is bits
        assert module.active_bits.numel() == -(-numel // 8)
        held = [layer.grow.positions, layer.grow.scores, layer.sensitivity.positions, layer.sensitivity.scores]
        n = int(0.5 * layer.k)
        # growth: the best inside and anywhere, plus every slot (so a dropped one can be picked again)
        assert all(t.numel() <= 2 * candidate_count(n, numel) + layer.k for t in held)
        assert not layer.grow.signed
        assert module.values.grad is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(update_interval=0), "--update-interval"),
        (dict(accumulation_steps=0), "--accumulation-steps"),
        (dict(drop_rate=1.5), "--drop-rate"),
        (dict(drop_schedule="step"), "--drop-schedule"),
        (dict(init="zeros"), "--init"),
        (dict(delta_density=0.0, lora_rank_equivalent=None), "--delta-density"),
        (dict(delta_density=0.1), "either --delta-density or --lora-rank-equivalent"),
        (dict(eviction="column"), "--eviction"),
        (dict(grow_score="max"), "--grow-score"),
        (dict(revived_lr_scale=0.0), "--revived-lr-scale"),
        (dict(revived_lr_scale=float("nan")), "--revived-lr-scale"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_built(overrides, message):
    with pytest.raises(SeftkitError, match=message):
        _config(**overrides)


def test_the_registry_builds_both_seft_methods():
    assert build_method(_config()).revive and not build_method(_config(method="seft-no-revive")).revive


def test_accumulation_windows_precede_each_boundary_but_not_the_end():
    run = _start(_config(init="random"), init=False)
    accumulating = []
    for step in range(STEPS):
        run.method.before_backward(step)
        if all(layer.module.grad_hook is not None for layer in run.method.layers):
            accumulating.append(step)
        else:
            assert all(layer.module.grad_hook is None for layer in run.method.layers)
    assert accumulating == [2, 3, 6, 7]
    assert [step for step in range(STEPS) if run.method.is_boundary(step)] == [3, 7]


def test_a_boundary_without_statistics_leaves_the_layer_alone():
    run = _start(_config(init="random"), init=False)
    with torch.no_grad():
        for param in run.method.trainable_parameters():
            param.uniform_(-1, 1)
    before = _topology(run)
    event = run.method.after_optimizer_step(3, run.optimizer)  # no before_backward: nothing was accumulated
    assert event["dropped"] == event["grown"] == 0
    for name, (indices, active, values) in _topology(run).items():
        assert torch.equal(indices, before[name][0]) and torch.equal(active, before[name][1])
        assert torch.equal(values, before[name][2])


def test_repurposed_slots_restart_as_fresh_adam_entries():
    run = _train(_start(_config(init="grad-active")), 3)
    before = {layer.name: layer.module.indices.clone() for layer in run.method.layers}
    _train(run, 4)  # step 3 ends with the first boundary
    for layer in run.method.layers:
        state = run.optimizer.state[layer.module.values]
        changed = layer.module.indices != before[layer.name]
        assert changed.any() and (layer.module.values[changed] == 0).all()
        assert (state["age"][changed] == 0).all() and (state["exp_avg"][changed] == 0).all()
        assert (state["age"][~changed] == 4).all() and (state["exp_avg_sq"][~changed] > 0).any()


@pytest.mark.parametrize("options", [dict(eviction="row"), dict(grow_score="abs-sum"), dict(keep_regrown=False),
                                     dict(revived_lr_scale=3.0, eviction="row", grow_score="abs-sum")],
                         ids=["row", "abs-sum", "restart-regrown", "all"])
def test_evolution_options_keep_every_layer_exact_through_merge(options):
    run = _train(_start(_config(**options)), STEPS)  # _train checks the invariants after every boundary
    assert sum(event["revived"] for event in run.events) > 0
    if options.get("keep_regrown", True):
        assert sum(event["regrown"] for event in run.events) > 0
    else:
        assert all(event["regrown"] == 0 for event in run.events)
    run.method.merge()
    for name, keep in run.masks.items():
        weight = linear_weight(run.model.get_submodule(name))
        assert int((weight != 0).sum()) == int(keep.sum())
        if options.get("eviction") == "row":
            assert torch.equal((weight != 0).sum(1), keep.sum(1))


def test_regrown_slots_keep_their_value_and_adam_state():
    run = _train(_start(_config()), 3)
    run.method.before_backward(3)
    _loss(run.model, run.batch).backward()
    run.optimizer.step()
    before = {layer.name: (layer.module.indices.clone(), layer.module.values.detach().clone(),
                           run.optimizer.state[layer.module.values]["age"].clone()) for layer in run.method.layers}
    event = run.method.after_optimizer_step(3, run.optimizer)
    kept = 0
    for layer in run.method.layers:
        indices, values, age = before[layer.name]
        dropped = torch.zeros(layer.k, dtype=torch.bool)
        dropped[torch.argsort(values.abs(), stable=True)[: int(0.5 * layer.k)]] = True
        restarted = run.optimizer.state[layer.module.values]["age"] == 0
        same = layer.module.indices == indices
        assert torch.equal(layer.module.values[~restarted], values[~restarted])
        assert (layer.module.values[restarted] == 0).all() and not bool((~same & ~restarted).any())
        assert torch.equal(run.optimizer.state[layer.module.values]["age"][~restarted], age[~restarted])
        kept += int((dropped & ~restarted).sum())
    assert kept == event["regrown"] > 0


def test_revived_slots_get_the_learning_rate_multiplier():
    run = _train(_start(_config(revived_lr_scale=4.0)), 4)  # step 3 ends with the first boundary
    for layer in run.method.layers:
        scale = run.optimizer.state[layer.module.values]["lr_scale"]
        revived = linear_weight(layer.module.base).reshape(-1)[layer.module.indices.long()] == 0
        assert torch.equal(scale, torch.where(revived, 4.0, 1.0))
    assert any(bool((run.optimizer.state[layer.module.values]["lr_scale"] == 4.0).any())
               for layer in run.method.layers)


def test_signed_growth_tracks_five_times_the_candidates():
    run = _train(_start(_config(grow_score="abs-sum")), 3)
    for layer in run.method.layers:
        n, numel = int(0.5 * layer.k), layer.module.weight.numel()
        assert layer.grow.signed
        assert candidate_count(n, numel) < layer.grow.positions.numel() <= 2 * candidate_count(n, numel, 5) + layer.k


def test_lowest_per_row_breaks_ties_toward_the_lower_position():
    from seftkit.repair.seft import _lowest_per_row

    sensitivity = torch.zeros(2, 40)
    sensitivity[1, :3] = torch.tensor([5.0, -1.0, 7.0]).abs()
    active = torch.ones(80, dtype=torch.bool)
    picked = _lowest_per_row(sensitivity, 2, active)  # count = 2 * 1 + 16 = 18 per row
    assert picked.tolist() == list(range(18)) + list(range(43, 61))  # row 1: the first 18 of its zeros
