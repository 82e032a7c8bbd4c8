"""The repair-method registry is the one place a method is named: the CLI, the config checks, the FSDP refusals
and the benches all follow it."""

import dataclasses

import pytest
from click.testing import CliRunner

from seftkit.cli.main import cli
from seftkit.errors import SeftkitError
from seftkit.repair import REPAIR_METHODS, RepairConfig
from seftkit.repair.method import RepairMethod
from seftkit.repair.registry import EVOLUTION_OPTIONS, REVIVAL_OPTIONS, baseline_methods, build_method, fsdp_methods


@pytest.mark.parametrize("name", list(REPAIR_METHODS))
def test_every_entry_builds_its_method_from_a_config(name):
    method = build_method(RepairConfig(method=name))
    assert isinstance(method, RepairMethod) and method.config.method == name
    entry = REPAIR_METHODS[name]
    assert set(entry.options) <= {f.name for f in dataclasses.fields(RepairConfig)}
    assert entry.summary and "\n" not in entry.summary


def test_the_cli_offers_exactly_the_registry_with_each_summary_in_its_help():
    from seftkit.cli.repair import repair as command

    method = next(p for p in command.params if p.name == "method")
    assert list(method.type.choices) == list(REPAIR_METHODS)
    help_text = CliRunner().invoke(cli, ["repair", "--help"], terminal_width=400).output
    assert all(name in help_text for name in REPAIR_METHODS)
    assert "fsdp: seft, seft-no-revive, masked-lora" in " ".join(help_text.split())


def test_fsdp_refusals_and_baselines_come_from_the_entries(monkeypatch):
    assert fsdp_methods() == ["seft", "seft-no-revive", "masked-lora"]
    assert baseline_methods() == ["lora-prune", "masked-lora", "static"]
    for name in ("static", "lora-prune"):
        with pytest.raises(SeftkitError, match=f"--method {name} cannot run sharded: .*fsdp runs seft, "
                                               "seft-no-revive and masked-lora"):
            RepairConfig(method=name, strategy="fsdp")
    entry = dataclasses.replace(REPAIR_METHODS["masked-lora"], fsdp_refusal="a reason of its own")
    monkeypatch.setitem(REPAIR_METHODS, "masked-lora", entry)
    with pytest.raises(SeftkitError, match="masked-lora cannot run sharded: a reason of its own; .*fsdp runs "
                                           "seft and seft-no-revive"):
        RepairConfig(method="masked-lora", strategy="fsdp")


def test_unknown_method_lists_the_registry():
    with pytest.raises(SeftkitError, match="unknown repair method 'dense'; choose from: seft, seft-no-revive, "
                                           "lora-prune, masked-lora, static"):
        RepairConfig(method="dense")


@pytest.mark.parametrize(("settings", "ignored"), [
    ({"method": "masked-lora", "drop_rate": 0.5, "eviction": "row"}, ["--drop-rate", "--eviction"]),
    ({"method": "seft-no-revive", "eviction": "row", "revived_lr_scale": 2.0, "drop_rate": 0.5},
     ["--eviction", "--revived-lr-scale"]),
    ({"method": "seft", "nm": "2:4", "revived_lr_scale": 2.0, "grow_score": "abs-sum"}, ["--revived-lr-scale"]),
    ({"method": "seft", "eviction": "row", "revived_lr_scale": 2.0, "drop_rate": 0.5}, []),
    ({"method": "seft", "revive": False, "eviction": "row"}, ["--eviction"]),
    ({"method": "static"}, []),
])
def test_options_a_method_does_not_read_are_named(settings, ignored):
    assert RepairConfig(**settings).ignored_options() == ignored
    assert set(EVOLUTION_OPTIONS).isdisjoint(REVIVAL_OPTIONS)


@pytest.mark.parametrize(("settings", "message"), [
    ({"steps": 0}, "--steps must be at least 1"),
    ({"log_every": 0}, "log_every must be at least 1"),
    ({"checkpoint_every": 0}, "--checkpoint-every must be at least 1"),
    ({"eval_windows": 0, "eval_ppl": "olmo:lambada:heldout"}, "--eval-windows must be at least 1"),
    ({"seqlen": 1}, "--seqlen must be at least 2"),
    ({"warmup_steps": -1}, "--warmup-steps must be at least 0"),
    ({"weight_decay": -0.1}, "--weight-decay must be a number >= 0"),
    ({"lr": 0.0}, "--lr must be a positive number"),
    ({"strategy": "zero3"}, "unknown --strategy 'zero3': use ddp, fsdp"),
    ({"drop_schedule": "step"}, "unknown --drop-schedule 'step': use cosine, linear, constant"),
    ({"eval_windows": 4}, "--eval-windows limits --eval-ppl; give --eval-ppl DATA as well"),
])
def test_the_config_refuses_what_cannot_train_when_built(settings, message):
    with pytest.raises(SeftkitError, match=message):
        RepairConfig(**settings)


def test_a_config_changed_after_it_was_built_is_checked_again_by_repair():
    from seftkit.repair import repair_model

    config = RepairConfig(method="static")
    config.steps = 0
    with pytest.raises(SeftkitError, match="--steps must be at least 1"):
        repair_model(None, None, config)
    config = RepairConfig(method="seft")
    config.lora_rank_equivalent = None
    with pytest.raises(SeftkitError, match="give a trainable budget"):
        repair_model(None, None, config)


def test_the_default_budget_is_rank_8_and_a_density_replaces_it():
    assert RepairConfig().lora_rank_equivalent == 8
    config = RepairConfig(delta_density=0.02)
    assert config.lora_rank_equivalent is None and config.delta_density == 0.02


def test_repair_warns_once_about_options_its_method_ignores(caplog, tiny_text_file):
    from conftest import make_tiny_model

    from seftkit.repair import repair_model

    model, tokenizer = make_tiny_model("llama")
    config = RepairConfig(method="masked-lora", data=str(tiny_text_file), steps=1, batch_size=1, seqlen=16,
                          drop_rate=0.5, lora_rank_equivalent=1)
    with caplog.at_level("WARNING", logger="seftkit.repair.trainer"):
        repair_model(model, tokenizer, config, progress=False)
    warnings = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert warnings == ["warning: --method masked-lora does not use --drop-rate"]
