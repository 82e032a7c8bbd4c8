"""The shared repair loop: determinism, resume after a kill, divergence, data order, LR schedule, reports."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from conftest import make_tiny_model, make_tokenizer

from seftkit.errors import DivergenceError, SeftkitError
from seftkit.eval.tasks import load_task
from seftkit.io import write_json
from seftkit.models import linear_weight, target_linears
from seftkit.prune import prune_model
from seftkit.repair import RepairConfig, repair_model, trainer
from seftkit.repair.batches import IGNORE_INDEX, build_batches, training_items
from seftkit.repair.checkpoint import STATE_FILE, has_checkpoint
from seftkit.sparsity.pattern import parse_pattern


@functools.cache
def _pruned_llama():
    model, tokenizer = make_tiny_model("llama")
    prune_model(model, tokenizer, "magnitude", parse_pattern(0.5), progress=False)
    return model, tokenizer


def pruned_llama():
    model, tokenizer = _pruned_llama()
    return copy.deepcopy(model), tokenizer


def config(method: str, data, **overrides) -> RepairConfig:
    settings = dict(method=method, data=str(data), steps=6, batch_size=2, seqlen=32, lr=1e-2,
                    lora_rank_equivalent=2, update_interval=3, accumulation_steps=2, checkpoint_every=2)
    return RepairConfig(**{**settings, **overrides})


def weights(model) -> dict[str, torch.Tensor]:
    return {name: linear_weight(m).detach().clone() for name, m in target_linears(model).items()}


@pytest.mark.parametrize("method", ["seft", "seft-no-revive", "lora-prune", "masked-lora", "static"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(method, tiny_text_file, tmp_path):
    model, tokenizer = pruned_llama()
    whole = repair_model(model, tokenizer, config(method, tiny_text_file), checkpoint_dir=tmp_path / "a",
                         progress=False)
    expected = weights(model)

    model, _ = pruned_llama()  # "killed" after 3 steps: the last checkpoint holds step 2
    cut = repair_model(model, tokenizer, config(method, tiny_text_file), checkpoint_dir=tmp_path / "b",
                       progress=False, stop_after=3)
    assert cut.steps_done == 3 and cut.sparsity_after is None
    model, _ = pruned_llama()
    resumed = repair_model(model, tokenizer, config(method, tiny_text_file), checkpoint_dir=tmp_path / "b",
                           resume=True, progress=False)
    assert resumed.resumed_from_step == 2
    got = weights(model)
    for name, weight in expected.items():  # bit-exact: the same arithmetic in the same order
        assert torch.equal(got[name].view(torch.uint8), weight.view(torch.uint8)), name
    assert resumed.loss_curve == whole.loss_curve
    assert resumed.events == whole.events


def test_same_seed_same_weights_other_seed_other_data(tiny_text_file):
    runs = []
    for seed in (0, 0, 1):
        model, tokenizer = pruned_llama()
        report = repair_model(model, tokenizer, config("static", tiny_text_file, seed=seed), progress=False)
        runs.append((weights(model), report.loss_curve))
    assert all(torch.equal(runs[0][0][name], runs[1][0][name]) for name in runs[0][0])
    assert runs[0][1] == runs[1][1]
    assert runs[0][1][0][1] != runs[2][1][0][1]


@pytest.mark.parametrize(("good_calls", "message", "kept_step"), [
    (5, r"loss became nan at step 3; try a lower --lr \(the last good checkpoint is kept in", 2),  # 2 init + 3
    (0, r"loss became nan before the first step; try a lower --lr \(no checkpoint\)", None),
])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(good_calls, message, kept_step, tiny_text_file,
                                                                  tmp_path, monkeypatch):
    calls = {"n": 0}
    real = trainer.micro_batch_loss

    def poisoned(model, batch, device):
        calls["n"] += 1
        loss = real(model, batch, device)
        return loss * float("nan") if calls["n"] > good_calls else loss

    monkeypatch.setattr(trainer, "micro_batch_loss", poisoned)
    model, tokenizer = pruned_llama()
    with pytest.raises(DivergenceError, match=message):
        repair_model(model, tokenizer, config("seft", tiny_text_file), checkpoint_dir=tmp_path, progress=False)
    if kept_step is None:
        assert not has_checkpoint(tmp_path)
    else:
        assert torch.load(tmp_path / STATE_FILE, weights_only=True)["progress"]["step"] == kept_step


def test_resume_refuses_a_checkpoint_made_with_other_settings(tiny_text_file, tmp_path):
    model, tokenizer = pruned_llama()
    repair_model(model, tokenizer, config("static", tiny_text_file), checkpoint_dir=tmp_path, progress=False,
                 stop_after=2)
    assert has_checkpoint(tmp_path)
    model, _ = pruned_llama()
    with pytest.raises(SeftkitError, match=r"different settings \(lr\)"):
        repair_model(model, tokenizer, config("static", tiny_text_file, lr=0.5), checkpoint_dir=tmp_path,
                     resume=True, progress=False)


def test_learning_rate_warms_up_then_decays_to_zero():
    cfg = RepairConfig(lr=1.0, steps=10, warmup_steps=2)
    assert [trainer.learning_rate(cfg, s) for s in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


@pytest.mark.parametrize("method", ["seft", "masked-lora", "static"])
def test_max_grad_norm_clips_the_trainable_gradient_before_the_step(method, tiny_text_file, monkeypatch):
    """Clipped to a norm far below Adam's eps, one step barely moves the weights; unclipped it moves them by ~lr."""
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm):
        parameters = list(parameters)
        clip(parameters, max_norm)
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters]))))

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    moved = {}
    for max_norm in (None, 1e-12):
        model, tokenizer = pruned_llama()
        before = weights(model)
        repair_model(model, tokenizer, config(method, tiny_text_file, steps=1, checkpoint_every=None,
                                              max_grad_norm=max_norm), progress=False)
        moved[max_norm] = max(float((w - before[name]).abs().max()) for name, w in weights(model).items())
    assert len(norms) == 1 and norms[0] <= 1e-12 * (1 + 1e-4)
    assert moved[None] > 0.5 * 1e-2 and moved[1e-12] < 1e-4 * moved[None]


@pytest.mark.parametrize("method", ["seft", "seft-no-revive"])
def test_a_budget_close_to_the_active_set_keeps_every_invariant(method, tiny_text_file):
    """k = 90% of the active set and every slot replaced at first: fewer eligible positions than candidates wanted,
    so every capped count in candidate selection matters (too high a count regrows slots or leaves the active set,
    which the per-update invariant check stops)."""
    model, tokenizer = pruned_llama()
    before = {name: int((w != 0).sum()) for name, w in weights(model).items()}
    repair_model(model, tokenizer, config(method, tiny_text_file, delta_density=0.45, lora_rank_equivalent=None,
                                          update_interval=2, drop_rate=1.0, checkpoint_every=None), progress=False)
    after = {name: int((w != 0).sum()) for name, w in weights(model).items()}
    assert after == before  # every layer's exact input nnz (a revived weight that ends at 0 must be replaced)


def test_a_topology_update_that_breaks_the_invariants_stops_the_run(tiny_text_file, monkeypatch):
    """Candidate selection derives its eligible counts from |active| = target nnz and k unique slots inside the
    active set, so an update that breaks them must stop the run, not go on choosing from the wrong positions."""
    from seftkit.repair import seft

    evolve = seft.evolve_layer

    def losing_an_active_weight(indices, magnitudes, active, *args):
        step = evolve(indices, magnitudes, active, *args)
        active[torch.nonzero(active).flatten()[0]] = False
        return step

    monkeypatch.setattr(seft, "evolve_layer", losing_an_active_weight)
    model, tokenizer = pruned_llama()
    with pytest.raises(RuntimeError, match="broke .* topology invariants"):
        repair_model(model, tokenizer, config("seft", tiny_text_file, checkpoint_every=None), progress=False)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"steps": 0}, "--steps must be at least 1"),
    ({"lr": float("nan")}, "--lr must be a positive number"),
    ({"delta_density": 0.1, "lora_rank_equivalent": 4}, "either --delta-density or --lora-rank-equivalent"),
    ({"delta_density": 1.5, "lora_rank_equivalent": None}, "--delta-density must be in"),
    ({"nm": "4:2"}, "need 0 < N < M"),
    ({"max_grad_norm": 0.0}, "--max-grad-norm must be a positive number"),
    ({"method": "dense"}, "unknown repair method 'dense'"),
])
def test_bad_settings_fail_before_training(overrides, message, tiny_text_file):
    model, tokenizer = pruned_llama()
    settings = {"method": "static", **overrides}
    with pytest.raises(SeftkitError, match=message):
        repair_model(model, tokenizer, config(settings.pop("method"), tiny_text_file, **settings), progress=False)


def test_text_batches_are_seeded_windows_with_loss_everywhere(tiny_text_file):
    tokenizer = make_tokenizer()
    a = build_batches(tokenizer, str(tiny_text_file), seqlen=16, batch_size=3, micro_batches=4, seed=7)
    b = build_batches(tokenizer, str(tiny_text_file), seqlen=16, batch_size=3, micro_batches=4, seed=7)
    c = build_batches(tokenizer, str(tiny_text_file), seqlen=16, batch_size=3, micro_batches=4, seed=8)
    batch = a.micro_batch(2)
    assert batch["input_ids"].shape == (3, 16)
    assert torch.equal(batch["labels"], batch["input_ids"]) and bool(batch["attention_mask"].all())
    assert all(torch.equal(a.micro_batch(i)["input_ids"], b.micro_batch(i)["input_ids"]) for i in range(4))
    assert not torch.equal(a.micro_batch(0)["input_ids"], c.micro_batch(0)["input_ids"])


def test_task_batches_train_on_answers_of_the_train_split_only():
    tokenizer = make_tokenizer()
    batches = build_batches(tokenizer, "olmo:piqa", seqlen=512, batch_size=2, micro_batches=1, seed=0)
    train = load_task("piqa", split="train")
    assert len(train) - 10 < len(batches.examples) == len(training_items("piqa")) < len(train)  # repeated goals
    answers = {item.continuations[item.gold] for item in train}
    heldout = {item.contexts[0] for item in load_task("piqa", split="heldout")}
    batch = batches.micro_batch(0)
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        answer = tokenizer.decode(labels[labels != IGNORE_INDEX])
        assert answer.endswith("<eos>") and answer.removesuffix("<eos>") in answers
        prompt = tokenizer.decode(ids[: int((labels == IGNORE_INDEX).logical_and(mask == 1).sum())])
        assert prompt not in heldout and prompt.startswith("Question: ")
        assert bool((labels[mask == 0] == IGNORE_INDEX).all())


def test_report_records_the_run_and_serialises(tiny_text_file, tmp_path):
    model, tokenizer = pruned_llama()
    report = repair_model(model, tokenizer, config("seft", tiny_text_file, steps=7, eval_ppl=str(tiny_text_file),
                                                   eval_tasks=["piqa"], eval_limit=4), progress=False)
    assert [step for step, _ in report.loss_curve] == list(range(7))
    assert [event["step"] for event in report.events] == [2, 5]  # boundaries after steps 3 and 6
    assert report.trainable_params == report.method_summary["trainable"]
    assert report.eval_after["ppl"] < report.eval_before["ppl"]
    assert set(report.eval_before) == set(report.eval_after) == {"ppl", "piqa_acc", "mean_acc"}
    assert report.eval_after["piqa_acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 heldout questions
    assert report.sparsity_before == pytest.approx(0.5) and report.peak_rss_mb > 0
    data = json.loads(write_json(tmp_path / "r.json", report).read_text())
    assert data["config"]["method"] == "seft" and len(data["layers"]) == 14


def test_gradient_checkpointing_changes_memory_not_results(tiny_text_file):
    results, block_calls = [], []
    for checkpointing in (False, True):
        model, tokenizer = pruned_llama()
        mlp, calls = model.model.layers[0].mlp, []
        # counted in forward itself: module hooks do not fire when checkpointing recomputes a block
        mlp.forward = lambda x, _forward=mlp.forward, _calls=calls: _calls.append(1) or _forward(x)
        repair_model(model, tokenizer, config("seft", tiny_text_file, gradient_checkpointing=checkpointing),
                     progress=False)
        results.append(weights(model))
        block_calls.append(len(calls))
        assert not any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    assert block_calls[1] == 2 * block_calls[0]  # every training forward inside a block is recomputed in backward
    for name, weight in results[0].items():
        assert torch.equal(weight != 0, results[1][name] != 0), name
        torch.testing.assert_close(results[1][name], weight, rtol=1e-5, atol=1e-6)


def test_repair_on_task_data_learns_the_answers():
    model, tokenizer = pruned_llama()
    report = repair_model(model, tokenizer, config("masked-lora", "olmo:piqa", steps=8, seqlen=64, lr=3e-2),
                          progress=False)
    losses = [loss for _, loss in report.loss_curve]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])


@pytest.mark.parametrize(("dtype", "native", "warned"), [(torch.bfloat16, False, True), (torch.bfloat16, True, False),
                                                         (torch.float32, False, False)])
def test_repair_warns_when_this_cpu_would_run_bf16_slowly(caplog, tiny_text_file, monkeypatch, dtype, native, warned):
    monkeypatch.setattr("seftkit.repair.trainer.cpu_runs_bf16_natively", lambda: native)
    model, tokenizer = make_tiny_model("llama")
    config = RepairConfig(method="masked-lora", data=str(tiny_text_file), steps=1, batch_size=1, seqlen=16,
                          lora_rank_equivalent=1)
    with caplog.at_level("WARNING", logger="seftkit.repair.trainer"):
        repair_model(model.to(dtype), tokenizer, config, progress=False)
    slow = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(slow) == int(warned)
    if warned:
        assert "--dtype fp32" in slow[0]
