"""The repair bench's --reuse: only baselines, only from an earlier run with the same shared settings (the dense
scores alone from one that differs in pruning or training)."""

from __future__ import annotations

import argparse
import json

import pytest

from seftkit.bench.repair_compare_results import SHARED_SETTINGS, reusable_runs, reused_run

SETTINGS = dict(model="smollm2-135m", sparsity=0.7, calib_samples=32, steps=100, batch_size=4, seqlen=128,
                lora_rank_equivalent=8, warmup_steps=0, max_grad_norm=None, gradient_checkpointing=False,
                eval_seqlen=512, eval_windows=40, eval_tasks="piqa,arc_easy", eval_limit=200, seed=0,
                data="olmo:lambada:train", max_per_task=None, val_limit=None, prune_method="wanda", device="cpu")


def _earlier(tmp_path, **changed):
    args = {key: str(value) for key, value in {**SETTINGS, **changed}.items()}
    args["update_interval"] = "20"  # a SEFT knob: never part of the match
    run = {"lr": 0.003, "val_ppl": 93.0, "memory": {"peak_rss_mb": 1.0}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"args": args, "dense": {"test_ppl": 42.0}, "pruned": {"test_ppl": 786.0},
                                "sweep": {"masked-lora": [run], "seft": [run], "static": [{"lr": 0.001,
                                                                                           "error": "diverged"}]}}))
    return path


def test_reuses_baseline_runs_without_their_memory_and_never_seft(tmp_path):
    earlier = reusable_runs(_earlier(tmp_path), argparse.Namespace(**SETTINGS, update_interval=10))
    assert earlier["dense"] == {"test_ppl": 42.0}
    assert reused_run(earlier, "masked-lora", 0.003) == {"lr": 0.003, "val_ppl": 93.0, "reused": True}
    assert reused_run(earlier, "masked-lora", 0.01) is None
    assert reused_run(earlier, "seft", 0.003) is None
    assert reused_run(earlier, "static", 0.001) is None  # a failed run is measured again


def test_refuses_an_earlier_run_whose_dense_scores_differ(tmp_path):
    with pytest.raises(ValueError, match="differ in steps, eval_limit, seed; nothing can be reused"):
        reusable_runs(_earlier(tmp_path, steps=40, eval_limit=100, seed=1), argparse.Namespace(**SETTINGS))
    assert reusable_runs(None, argparse.Namespace(**SETTINGS)) == {}
    with pytest.raises(ValueError, match="not a readable"):
        reusable_runs(tmp_path / "missing.json", argparse.Namespace(**SETTINGS))
    assert set(SETTINGS) == set(SHARED_SETTINGS)


def test_results_from_before_warmup_and_clipping_were_shared_count_as_run_without_them(tmp_path):
    path = _earlier(tmp_path)
    recorded = json.loads(path.read_text())
    for key in ("warmup_steps", "max_grad_norm"):
        del recorded["args"][key]
    path.write_text(json.dumps(recorded))
    assert reusable_runs(path, argparse.Namespace(**SETTINGS))["dense"] == {"test_ppl": 42.0}
    with pytest.raises(ValueError, match="differ in warmup_steps, max_grad_norm, eval_limit"):
        reusable_runs(path, argparse.Namespace(**{**SETTINGS, "warmup_steps": 10, "max_grad_norm": 1.0,
                                                  "eval_limit": 100}))


def test_another_pruning_or_training_reuses_only_the_dense_scores(tmp_path, capsys):
    args = argparse.Namespace(**{**SETTINGS, "sparsity": 0.5, "prune_method": "magnitude", "steps": 40})
    earlier = reusable_runs(_earlier(tmp_path), args)
    assert earlier == {"dense": {"test_ppl": 42.0}}
    assert reused_run(earlier, "masked-lora", 0.003) is None
    assert "differ in sparsity, steps, prune_method; only the dense model's scores" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a positive number"),
    (["--methods", "seft", "--drop-rate", "2"], "--drop-rate must be in"),
    (["--extra-seeds", "1,x"], "--extra-seeds '1,x': expected comma-separated integers"),
    (["--extra-seeds", "0,1"], "--extra-seeds must be distinct and differ from --seed"),
    (["--data", "olmo:commonsense8:heldout"], "the bench trains on each task's train split"),
    (["--max-per-task", "5"], "caps multiple-choice task data"),
    (["--data", "olmo:piqa", "--seft-option", "nope=1"], "RepairConfig field"),
    (["--data", "olmo:piqa", "--eval-tasks", "nope"], "unknown task nope"),
])
def test_bad_settings_stop_the_bench_before_any_work(flags, message, tmp_path, monkeypatch, capsys):
    from seftkit.bench import repair_compare

    monkeypatch.setattr("sys.argv", ["repair_compare", *flags, "--workdir", str(tmp_path / "work")])
    with pytest.raises(SystemExit) as exit_info:
        repair_compare.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_extra_seed_runs_of_baselines_are_reused_by_seed_and_never_for_seft(tmp_path):
    from seftkit.bench.repair_compare_results import reused_seed_run

    path = _earlier(tmp_path)
    recorded = json.loads(path.read_text())
    seeds = [{"seed": 1, "test_ppl": 90.0}, {"seed": 2, "error": "loss is nan"}]
    for method in ("masked-lora", "seft"):
        recorded["sweep"][method][0]["seeds"] = seeds
    path.write_text(json.dumps(recorded))
    earlier = reusable_runs(path, argparse.Namespace(**SETTINGS))
    assert reused_seed_run(earlier, "masked-lora", 0.003, 1) == {"seed": 1, "test_ppl": 90.0, "reused": True}
    assert reused_seed_run(earlier, "masked-lora", 0.003, 2) is None  # failed: measured again
    assert reused_seed_run(earlier, "masked-lora", 0.01, 1) is None
    assert reused_seed_run(earlier, "seft", 0.003, 1) is None
    assert "seeds" not in reused_run(earlier, "masked-lora", 0.003)


def test_seed_summary_gives_mean_sample_sd_and_gap_closed_and_names_failed_seeds():
    from seftkit.bench.repair_compare_table import format_seeds

    best = {"seft": {"test_ppl": 80.0, "seeds": [{"seed": 1, "test_ppl": 90.0}, {"seed": 2, "test_ppl": 100.0},
                                                 {"seed": 3, "test_ppl": float("nan")}]},
            "static": {"test_ppl": 70.0}, "lora-prune": None}
    lines = format_seeds({"test_ppl": 40.0}, {"test_ppl": 790.0}, best, seed=0)
    assert len(lines) == 3  # a title and seft's row; static ran one seed only, lora-prune failed
    assert "mean    90.00 +- 10.00" in lines[2] and "gap closed  93.3%" in lines[2]
    assert "(0: 80.00, 1: 90.00, 2: 100.00)  failed seeds: 3" in lines[2]
    assert format_seeds({"test_ppl": 40.0}, {"test_ppl": 790.0}, {"static": {"test_ppl": 70.0}}, seed=0) == []


def test_seed_summary_pairs_every_method_with_seft_seed_by_seed():
    from seftkit.bench.repair_compare_table import format_seeds

    best = {"seft": {"test_ppl": 80.0, "seeds": [{"seed": 1, "test_ppl": 90.0}, {"seed": 2, "test_ppl": 100.0}]},
            "masked-lora": {"test_ppl": 82.0, "seeds": [{"seed": 1, "test_ppl": 94.0},
                                                        {"seed": 2, "error": "loss is nan"}]}}
    lines = format_seeds({"test_ppl": 40.0}, {"test_ppl": 790.0}, best, seed=0)
    assert "same seeds" not in lines[2]
    assert "seft minus this, same seeds:    -3.00 +-  1.41 (n=2)" in lines[3]  # seeds 0 and 1: -2, -4


def test_combine_prints_parts_of_one_protocol_as_one_comparison(tmp_path, monkeypatch, capsys):
    from seftkit.bench import repair_compare
    from seftkit.bench.repair_compare_results import combined_results

    base = {"args": {**{k: str(v) for k, v in SETTINGS.items()}, "update_interval": "10"},
            "dense": {"test_ppl": 40.0}, "pruned": {"test_ppl": 790.0}}
    run = {"lr": 0.003, "val_ppl": 95.0, "test_ppl": 92.0, "trainable": 10, "step_time_s": 2.0}
    parts = {"a.json": {"masked-lora": [{**run, "lr": 0.01}]}, "b.json": {"seft": [run], "seft-no-revive": [run]},
             "c.json": {"seft": [run]}}
    for name, sweep in parts.items():
        (tmp_path / name).write_text(json.dumps({**base, "sweep": sweep}))
    monkeypatch.setattr("sys.argv", ["repair_compare", "--combine", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}"])
    repair_compare.main()
    table = capsys.readouterr().out
    assert all(f"{name:<16}" in table for name in ("masked-lora", "seft", "seft-no-revive"))
    assert "92.000" in table and "1e-02" in table

    with pytest.raises(ValueError, match=r"seft \(lr 0.003\) is in two of the files"):
        combined_results([tmp_path / "b.json", tmp_path / "c.json"])
    other = {**base, "args": {**base["args"], "steps": "40"}, "sweep": {}}
    (tmp_path / "d.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="differ from .*a.json's in steps"):
        combined_results([tmp_path / "a.json", tmp_path / "d.json"])
    with pytest.raises(ValueError, match="not a readable"):
        combined_results([tmp_path / "a.json", tmp_path / "missing.json"])
    with pytest.raises(ValueError, match="needs at least one"):
        combined_results([])


def test_combine_shows_the_seft_methods_of_a_file_with_other_seft_settings_as_a_variant(tmp_path, monkeypatch,
                                                                                         capsys):
    from seftkit.bench import repair_compare
    from seftkit.bench.repair_compare_results import combined_results

    args = {**{k: str(v) for k, v in SETTINGS.items()}, "update_interval": "10", "drop_rate": "0.5",
            "seft_option": "[]"}
    run = {"lr": 0.001, "val_ppl": 95.0, "test_ppl": 92.0, "trainable": 10, "step_time_s": 2.0}
    files = {"default.json": ({}, {"seft": [run], "masked-lora": [run]}),
             "row.json": ({"seft_option": "['eviction=row']"}, {"seft": [{**run, "test_ppl": 90.0}],
                                                                "seft-no-revive": [run]}),
             "row-seed1.json": ({"seft_option": "['eviction=row']"}, {"seft": [{**run, "lr": 0.003}]}),
             "sched.json": ({"update_interval": "20", "drop_rate": "0.2"}, {"seft": [run]}),
             "sched-mlora.json": ({"update_interval": "20", "drop_rate": "0.2"}, {"masked-lora": [run]})}
    for name, (changed, sweep) in files.items():
        (tmp_path / name).write_text(json.dumps({"args": {**args, **changed}, "dense": None, "pruned": None,
                                                 "sweep": sweep}))
    merged = combined_results([tmp_path / name for name in list(files)[:-1]])
    assert merged["variants"] == {"v1": "eviction=row", "v2": "update_interval=20, drop_rate=0.2"}
    assert [r["lr"] for r in merged["sweep"]["seft v1"]] == [0.001, 0.003]  # the same variant merges
    assert set(merged["sweep"]) == {"seft", "masked-lora", "seft v1", "seft-no-revive v1", "seft v2"}
    with pytest.raises(ValueError, match=r"masked-lora \(lr 0.001\) is in two"):  # a baseline has no variants
        combined_results([tmp_path / "default.json", tmp_path / "sched-mlora.json"])
    reversed_ = combined_results([tmp_path / "row.json", tmp_path / "default.json"])
    assert reversed_["variants"] == {"v1": "no --seft-option"}

    (tmp_path / "sched.json").write_text(json.dumps({"args": {**args, "update_interval": "20", "drop_rate": "0.2"},
                                                     "dense": {"test_ppl": 40.0}, "pruned": {"test_ppl": 790.0},
                                                     "sweep": {"seft": [run]}}))
    monkeypatch.setattr("sys.argv", ["repair_compare", "--combine", f"{tmp_path / 'default.json'},"
                                     f"{tmp_path / 'sched.json'}"])
    repair_compare.main()
    out = capsys.readouterr().out
    assert out.startswith(f"SEFT v1: update_interval=20, drop_rate=0.2 (the SEFT settings of "
                          f"{tmp_path / 'default.json'} otherwise)\n")
    assert f"{'seft v1':<16}" in out


TASKS = ["boolq", "piqa"]


def _task_run(seed_outcomes: dict[str, str], lr: float = 1e-3, val_acc: float = 0.5, **extra) -> dict:
    """A task-mode run whose held-out outcomes are the given 0/1 strings."""
    acc = {t: o.count("1") / len(o) for t, o in seed_outcomes.items()}
    n = sum(len(o) for o in seed_outcomes.values())
    micro = sum(o.count("1") for o in seed_outcomes.values()) / n
    return {"lr": lr, "val_acc": val_acc, "val_gold_loglik": -1.0, "test_acc": micro,
            "test_macro_acc": sum(acc.values()) / len(acc), "test_acc_norm": micro, "test_gold_loglik": -1.5,
            "acc": acc, "chance": {"boolq": 0.5, "piqa": 0.5}, "n": {t: len(o) for t, o in seed_outcomes.items()},
            "correct": seed_outcomes, "trainable": 100, "step_time_s": 1.0, **extra}


def test_seft_options_set_typed_config_fields_for_the_seft_methods_only():
    from seftkit.bench.repair_compare import parse_seft_options, repair_config
    from seftkit.errors import SeftkitError

    assert parse_seft_options(["update_interval=20", "drop-rate=0.5", "revive=false", "max_grad_norm=none",
                               "init=grad"]) == {"update_interval": 20, "drop_rate": 0.5, "revive": False,
                                                 "max_grad_norm": None, "init": "grad"}
    for bad, message in (("nope=1", "RepairConfig field"), ("steps", "KEY=VALUE"), ("steps=x", "invalid literal"),
                         ("revive=maybe", "expected true or false")):
        with pytest.raises(SeftkitError, match=message):
            parse_seft_options([bad])
    args = argparse.Namespace(**{**SETTINGS, "max_per_task": 50, "data": "olmo:commonsense8", "update_interval": 10,
                                 "accumulation_steps": 3, "drop_rate": 0.2, "init": "grad-active",
                                 "seft_option": ["drop_rate=0.5"]})
    seft, mlora = (repair_config(args, m, 1e-3, 10) for m in ("seft", "masked-lora"))
    assert (seft.drop_rate, mlora.drop_rate) == (0.5, 0.2)
    assert seft.data == mlora.data == ("olmo:boolq+piqa+social_iqa+hellaswag+winogrande+arc_easy+arc_challenge+"
                                       "openbookqa:fit") and seft.max_per_task == 50


def test_paired_bootstrap_averages_shared_seeds_and_resamples_within_tasks():
    from seftkit.bench.repair_compare_results import paired_bootstrap

    ref = {0: _task_run({"boolq": "1111", "piqa": "11"}), 1: _task_run({"boolq": "1111", "piqa": "10"})}
    same = paired_bootstrap(ref, ref, TASKS)
    assert same["diff"] == same["low"] == same["high"] == 0.0 and same["questions"] == 6
    worse = {0: _task_run({"boolq": "0000", "piqa": "00"}), 2: _task_run({"boolq": "1111", "piqa": "11"})}
    result = paired_bootstrap(worse, ref, TASKS)
    assert result["seeds"] == [0] and result["diff"] == result["low"] == result["high"] == 1.0
    mixed = {0: _task_run({"boolq": "1100", "piqa": "01"}), 1: _task_run({"boolq": "1000", "piqa": "11"})}
    result = paired_bootstrap(mixed, ref, TASKS)  # differences: boolq 0, .5, 1, 1; piqa .5, -.5
    assert result["diff"] == pytest.approx(2.5 / 6) and result["low"] < 2.5 / 6 < result["high"]
    assert result == paired_bootstrap(mixed, ref, TASKS)  # seeded
    assert paired_bootstrap({5: mixed[0]}, ref, TASKS) is None


def test_task_report_gives_seed_spread_paired_intervals_and_chance_margins():
    from seftkit.bench.repair_compare_table import format_task_report

    good, bad = {"boolq": "1" * 40, "piqa": "1" * 30 + "0" * 10}, {"boolq": "0" * 40, "piqa": "0" * 40}
    sweep = {"seft": [_task_run(good, lr=1e-3, val_acc=0.6, seeds=[{"seed": 1, **_task_run(good)}]),
                      _task_run(bad, lr=1e-2, val_acc=0.4)],
             "masked-lora": [_task_run(bad, seeds=[{"seed": 1, **_task_run(bad)}, {"seed": 2, "error": "nan"}])]}
    text = format_task_report(_task_run(good), _task_run(bad), sweep, seed=0)
    seft_row = next(line for line in text.splitlines() if line.startswith("seft  "))
    assert "1e-03" in seft_row and "0.8750" in seft_row  # the lr with the higher val accuracy; (40+30)/80
    spread = next(line for line in text.splitlines() if line.startswith("  masked-lora") and "0,1" in line)
    assert "0.0000±0.0000" in spread and "failed seeds: 2" in spread
    paired = next(line for line in text.splitlines() if line.startswith("  masked-lora") and "seeds 0,1" in line)
    assert "+0.8750  [+0.8" in paired and ", +0.9" in paired and "seft better" in paired
    assert "paired bootstrap over the questions" in text and "2000 resamples" in text
    gain = text.split("gain over the pruned model")[1].splitlines()
    assert gain[1].split() == ["all", "tasks"]  # the dense model is above chance on both: one subset, one column
    margins = text.splitlines()[-3:]
    assert margins[0].split()[:2] == ["pruned", "-0.500"] and "+0.500*" in margins[1]


def test_paired_intervals_are_repeated_on_the_tasks_the_dense_model_answers_above_chance():
    from seftkit.bench.repair_compare_table import above_chance, format_task_report

    dense = _task_run({"boolq": "10" * 20, "piqa": "1" * 36 + "0" * 4})  # boolq at chance, piqa far above
    assert above_chance(dense, ["boolq", "piqa"]) == ["piqa"]
    seft = _task_run({"boolq": "1" * 40, "piqa": "1" * 20 + "0" * 20})
    other = _task_run({"boolq": "0" * 40, "piqa": "1" * 20 + "0" * 20})
    text = format_task_report(dense, dense, {"seft": [seft], "masked-lora": [other]}, seed=0)
    blocks = text.split("paired difference")[1:]
    assert len(blocks) == 2 and "only the tasks the dense model answers above chance (piqa)" in blocks[1]
    assert "+0.5000" in blocks[0] and "seft better" in blocks[0]  # all of it from boolq
    assert "+0.0000" in blocks[1] and "no difference at 95%" in blocks[1]


def test_gain_over_the_pruned_model_pairs_every_seed_with_the_pruned_outcomes_per_subset():
    from seftkit.bench.repair_compare_table import format_task_report

    pruned = _task_run({"boolq": "0" * 40, "piqa": "1" * 20 + "0" * 20})
    dense = _task_run({"boolq": "10" * 20, "piqa": "1" * 36 + "0" * 4})  # skill on piqa only
    same = _task_run({"boolq": "0" * 40, "piqa": "1" * 20 + "0" * 20})
    seft = _task_run({"boolq": "1" * 40, "piqa": "1" * 20 + "0" * 20},
                     seeds=[{"seed": 1, **_task_run({"boolq": "0" * 40, "piqa": "1" * 20 + "0" * 20})}])
    text = format_task_report(dense, pruned, {"seft": [seft], "masked-lora": [same]}, seed=0)
    block = text.split("gain over the pruned model")[1].split("\n\n")[0].splitlines()
    assert block[1].split() == ["all", "tasks", "dense", "above", "chance"]
    rows = {line.split()[0]: line.split(maxsplit=1)[1] for line in block[2:]}
    assert list(rows) == ["dense", "seft", "masked-lora"]
    dense_cells = rows["dense"].split()  # boolq 20 against 0 of 40, piqa 36 against 20 of 40
    assert (dense_cells[0], dense_cells[3]) == ("+0.4500", "+0.4000")
    assert dense_cells[2].endswith("]*") and dense_cells[5].endswith("]*")
    assert rows["seft"].split()[:3] == ["+0.2500", "[+0.2500,", "+0.2500]*"]  # boolq +1 at seed 0, 0 at seed 1
    assert rows["seft"].split()[3:] == ["+0.0000", "[+0.0000,", "+0.0000]"]
    assert rows["masked-lora"].split() == ["+0.0000", "[+0.0000,", "+0.0000]"] * 2


def test_combine_merges_parts_by_learning_rate_and_seed(tmp_path):
    from seftkit.bench.repair_compare_results import combined_results

    args = {k: str(v) for k, v in SETTINGS.items()}
    run = {"lr": 0.001, "val_ppl": 90.0, "test_ppl": 91.0}
    parts = {"sweep.json": [run, {**run, "lr": 0.01}],
             "seeds.json": [{**run, "reused": True, "seeds": [{"seed": 1, "test_ppl": 95.0}]}],
             "more.json": [{**run, "reused": True, "seeds": [{"seed": 2, "test_ppl": 96.0},
                                                           {"seed": 1, "error": "died"}]}]}
    for name, runs in parts.items():
        (tmp_path / name).write_text(json.dumps({"args": args, "dense": None if name != "seeds.json" else {"a": 1},
                                                 "pruned": None, "sweep": {"seft": runs}}))
    merged = combined_results([tmp_path / name for name in parts])
    (chosen, other) = merged["sweep"]["seft"]
    assert "reused" not in chosen and other["lr"] == 0.01 and merged["dense"] == {"a": 1}
    assert chosen["seeds"] == [{"seed": 1, "test_ppl": 95.0}, {"seed": 2, "test_ppl": 96.0}]
    (tmp_path / "again.json").write_text(json.dumps({"args": args, "sweep": {"seft": [
        {**run, "reused": True, "seeds": [{"seed": 2, "test_ppl": 97.0}]}]}}))
    with pytest.raises(ValueError, match="seft seed 2 is in two of the files"):
        combined_results([tmp_path / "more.json", tmp_path / "again.json"])


def test_every_run_is_saved_as_it_finishes_and_a_dead_sweep_combines(tmp_path, monkeypatch, capsys):
    from seftkit.bench import repair_compare

    outcomes = {"boolq": "10" * 10, "piqa": "1100" * 5}
    calls = []

    def fake_run(job, env=None):
        calls.append(job)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the sweep dies during its fifth run
        return {k: v for k, v in _task_run(outcomes).items() if k != "lr"}

    monkeypatch.setattr(repair_compare, "run_job", fake_run)
    monkeypatch.setattr(repair_compare, "ensure_pruned", lambda *a: tmp_path / "pruned")
    out = tmp_path / "part.json"
    monkeypatch.setattr("sys.argv", ["repair_compare", "--data", "olmo:boolq+piqa", "--methods", "seft,masked-lora",
                                     "--lrs", "1e-3,1e-2", "--max-per-task", "10", "--no-memory", "--json", str(out)])
    with pytest.raises(KeyboardInterrupt):
        repair_compare.main()
    assert calls[2]["val_tasks"] == ["boolq", "piqa"] and calls[2]["config"]["data"] == "olmo:boolq+piqa:fit"
    assert "val_tasks" not in calls[0] and "config" not in calls[1]  # dense and pruned: no lr to choose
    saved = json.loads(out.read_text())
    assert [r["lr"] for r in saved["sweep"]["seft"]] == [1e-3, 1e-2] and "masked-lora" not in saved["sweep"]
    assert saved["args"]["eval_tasks"] == "boolq,piqa" and saved["args"]["eval_limit"] == "None"
    monkeypatch.setattr("sys.argv", ["repair_compare", "--combine", str(out)])
    repair_compare.main()
    assert "paired difference in held-out micro accuracy" in capsys.readouterr().out


def test_one_learning_rate_scores_no_val_questions_and_still_reports(tmp_path, monkeypatch, capsys):
    from seftkit.bench import repair_compare

    calls = []

    def fake_run(job, env=None):
        calls.append(job)
        run = {k: v for k, v in _task_run({"boolq": "10" * 10, "piqa": "1100" * 5}).items() if k != "lr"}
        return {k: v for k, v in run.items() if not k.startswith("val_")}

    monkeypatch.setattr(repair_compare, "run_job", fake_run)
    monkeypatch.setattr(repair_compare, "ensure_pruned", lambda *a: tmp_path / "pruned")
    monkeypatch.setattr("sys.argv", ["repair_compare", "--data", "olmo:boolq+piqa", "--methods", "seft,masked-lora",
                                     "--lrs", "3e-3", "--max-per-task", "10", "--no-memory",
                                     "--json", str(tmp_path / "one.json")])
    repair_compare.main()
    assert len(calls) == 4 and not any("val_tasks" in job for job in calls)
    out = capsys.readouterr().out
    assert "one learning rate per method (no sweep)" in out and "paired difference in held-out micro accuracy" in out


def test_a_sweep_run_a_rate_per_process_scores_val_and_picks_its_rate_when_combined(tmp_path, monkeypatch):
    from seftkit.bench import repair_compare
    from seftkit.bench.repair_compare_results import combined_results, pick_best

    calls = []
    outcomes = {"boolq": "10" * 10, "piqa": "1100" * 5}

    def fake_run(job, env=None):
        calls.append(job)
        lr = job.get("config", {}).get("lr", 0.0)
        return {k: v for k, v in _task_run(outcomes, val_acc=0.6 if lr == 3e-3 else 0.4).items() if k != "lr"}

    monkeypatch.setattr(repair_compare, "run_job", fake_run)
    monkeypatch.setattr(repair_compare, "ensure_pruned", lambda *a: tmp_path / "pruned")
    for lr in ("1e-3", "3e-3"):
        monkeypatch.setattr("sys.argv", ["repair_compare", "--data", "olmo:boolq+piqa", "--methods", "seft",
                                         "--lrs", lr, "--score-val", "--max-per-task", "10", "--no-memory",
                                         "--json", str(tmp_path / f"{lr}.json")])
        repair_compare.main()
    dense, pruned, seft = (False, False), (False, False), (True, True)  # (scores val, trains)
    assert [("val_tasks" in job, "config" in job) for job in calls] == [dense, pruned, seft] * 2
    merged = combined_results([tmp_path / "1e-3.json", tmp_path / "3e-3.json"])
    assert [r["lr"] for r in merged["sweep"]["seft"]] == [1e-3, 3e-3]
    assert pick_best(merged["sweep"]["seft"])["lr"] == 3e-3


def test_a_rate_not_scored_on_val_is_neither_reused_by_a_sweep_nor_combined_into_one(tmp_path):
    from seftkit.bench.repair_compare_results import combined_results, pick_best, reused_run

    outcomes = {"boolq": "10" * 10, "piqa": "1100" * 5}
    unscored = {k: v for k, v in _task_run(outcomes, lr=3e-3).items() if not k.startswith("val_")}
    earlier = {"sweep": {"masked-lora": [unscored]}}
    assert reused_run(earlier, "masked-lora", 3e-3)["test_acc"] == unscored["test_acc"]
    assert reused_run(earlier, "masked-lora", 3e-3, needs_val=True) is None  # a sweep measures it again
    args = {k: str(v) for k, v in SETTINGS.items()}
    for name, run in (("scored.json", _task_run(outcomes, lr=1e-3)), ("alone.json", unscored)):
        (tmp_path / name).write_text(json.dumps({"args": args, "dense": None, "pruned": None,
                                                 "sweep": {"masked-lora": [run]}}))
    assert combined_results([tmp_path / "alone.json"])["sweep"]["masked-lora"] == [unscored]
    with pytest.raises(ValueError, match="masked-lora has runs at 2 rates but those at 0.003 were not scored on val"):
        combined_results([tmp_path / "scored.json", tmp_path / "alone.json"])
    (tmp_path / "failed.json").write_text(json.dumps({"args": args, "dense": None, "pruned": None, "sweep": {
        "masked-lora": [{"lr": 1e-2, "error": "loss is nan"}]}}))
    merged = combined_results([tmp_path / "failed.json", tmp_path / "alone.json"])  # one rate finished: no choice
    assert pick_best(merged["sweep"]["masked-lora"]) == unscored
    with pytest.raises(ValueError, match="masked-lora has runs at 2 rates but those at 0.003 were not"):
        combined_results([tmp_path / "failed.json", tmp_path / "scored.json", tmp_path / "alone.json"])


def test_combined_parts_with_and_without_a_val_sweep_print_which_rates_were_not_scored(tmp_path, monkeypatch, capsys):
    from seftkit.bench import repair_compare

    outcomes = {"boolq": "10" * 10, "piqa": "1100" * 5}
    pruned = {k: v for k, v in _task_run(outcomes).items() if k not in ("lr", "val_acc", "val_gold_loglik")}
    args = {k: str(v) for k, v in SETTINGS.items()}
    parts = {"swept.json": {"masked-lora": [_task_run(outcomes, lr=1e-2)]},
             "one-rate.json": {"seft": [{k: v for k, v in _task_run(outcomes, lr=3e-3).items()
                                         if not k.startswith("val_")}]}}
    for name, sweep in parts.items():
        (tmp_path / name).write_text(json.dumps({"args": args, "dense": pruned, "pruned": pruned, "sweep": sweep}))
    monkeypatch.setattr("sys.argv", ["repair_compare", "--combine", f"{tmp_path / 'swept.json'},"
                                                                     f"{tmp_path / 'one-rate.json'}"])
    repair_compare.main()
    sweep_lines = capsys.readouterr().out.split("\n\n")[0]
    assert "masked-lora     1e-02: 0.5000 [-1.000]" in sweep_lines
    assert "seft            3e-03: not scored (one rate)" in sweep_lines


def _saved_task_comparison() -> dict:
    """A combined task-mode result: the dense model has skill on piqa only; seft gains on boolq at seed 0."""
    pruned = _task_run({"boolq": "0" * 40, "piqa": "1" * 20 + "0" * 20})
    dense = _task_run({"boolq": "10" * 20, "piqa": "1" * 36 + "0" * 4})
    seft = _task_run({"boolq": "1" * 40, "piqa": "1" * 20 + "0" * 20},
                     seeds=[{"seed": 1, **_task_run({"boolq": "0" * 40, "piqa": "1" * 20 + "0" * 20})}])
    same = _task_run({"boolq": "0" * 40, "piqa": "1" * 20 + "0" * 20}, lr=1e-2)
    args = {**{k: str(v) for k, v in SETTINGS.items()}, "select": "acc"}
    no_outcomes = {k: v for k, v in same.items() if k != "correct"}  # as saved before per-question outcomes were
    return {"args": args, "dense": dense, "pruned": pruned, "variants": {},
            "sweep": {"seft": [seft], "masked-lora": [same], "static": [{"lr": 1e-4, "error": "diverged"}],
                      "lora-prune": [no_outcomes]}}


def test_the_task_picture_draws_the_tables_gains_and_margins():
    from seftkit.bench.repair_compare_plot import draw_task_comparison
    from seftkit.bench.repair_compare_table import gains_over_pruned

    saved = _saved_task_comparison()
    figure = draw_task_comparison({**saved, "variants": {"v1": "keep_regrown=False"}})
    assert figure.get_suptitle() == ("smollm2-135m, wanda 70%: repair on 80 held-out questions of 2 tasks\n"
                                     "SEFT v1: keep_regrown=False")
    gain_ax, margin_ax = draw_task_comparison(saved).axes
    points = [(bar.lines[0].get_xdata()[0], bar.lines[0].get_ydata()[0], bar.lines[0].get_color(),
               tuple(bar.lines[2][0].get_segments()[0][:, 0])) for bar in gain_ax.containers]
    # all tasks (blue, above each row) for dense, seft, masked-lora, then piqa alone (orange, below): the table's
    # gain cells and their intervals; lora-prune has no per-question outcomes, static no run
    assert [p[:3] for p in points] == [(0.45, -0.15, "tab:blue"), (0.25, 0.85, "tab:blue"), (0.0, 1.85, "tab:blue"),
                                       (0.4, 0.15, "tab:orange"), (0.0, 1.15, "tab:orange"),
                                       (0.0, 2.15, "tab:orange")]
    dense_all = gains_over_pruned(saved["dense"], saved["pruned"], {}, {"all": ["boolq", "piqa"]}, 0)["dense"]["all"]
    assert points[0][3] == (dense_all["low"], dense_all["high"]) and dense_all["low"] < 0.45 < dense_all["high"]
    assert [t.get_text() for t in gain_ax.get_yticklabels()] == [
        "dense", "seft\n(lr 1e-03, 2 seeds)", "masked-lora\n(lr 1e-02, 1 seed)",
        "lora-prune\n(lr 1e-02, 1 seed; no per-question outcomes)"]
    assert [t.get_text() for t in gain_ax.get_legend().get_texts()] == ["all tasks", "dense above chance"]
    heights = [round(bar.get_height(), 3) for bar in margin_ax.patches]
    # per row (dense, pruned, seft mean over seeds, masked-lora, lora-prune), boolq then piqa, accuracy minus 0.5
    assert heights == [0.0, 0.4, -0.5, 0.0, 0.0, 0.0, -0.5, 0.0, -0.5, 0.0]
    assert [t.get_text() for t in margin_ax.get_xticklabels()] == ["boolq", "piqa*"]


def test_combine_plot_writes_a_png_and_refuses_what_it_cannot_draw(tmp_path, monkeypatch, capsys):
    import matplotlib.image

    from seftkit.bench import repair_compare
    from seftkit.bench.repair_compare_plot import SIZE
    from seftkit.plot import DPI

    saved = _saved_task_comparison()
    (tmp_path / "t.json").write_text(json.dumps({k: saved[k] for k in ("args", "dense", "pruned", "sweep")}))
    monkeypatch.setattr("sys.argv", ["repair_compare", "--combine", str(tmp_path / "t.json"), "--plot",
                                     str(tmp_path / "t.png")])
    repair_compare.main()
    assert capsys.readouterr().out.endswith(f"wrote {tmp_path / 't.png'}\n")
    assert matplotlib.image.imread(tmp_path / "t.png").shape[:2] == (SIZE[1] * DPI, SIZE[0] * DPI)

    text = {"args": {k: str(v) for k, v in SETTINGS.items()}, "dense": {"test_ppl": 40.0},
            "pruned": {"test_ppl": 790.0}, "sweep": {}}
    (tmp_path / "text.json").write_text(json.dumps(text))
    (tmp_path / "seft-only.json").write_text(json.dumps({**text, "dense": None, "pruned": None}))
    for argv, message in (([str(tmp_path / "text.json"), "--plot", str(tmp_path / "x.png")],
                           "--plot draws a task-mode comparison; these results are text mode"),
                          ([str(tmp_path / "seft-only.json"), "--plot", str(tmp_path / "x.png")],
                           "none of the files holds the pruned model's scores"),
                          ([str(tmp_path / "t.json"), "--plot", str(tmp_path / "x.jpg")],
                           "the picture is a PNG; name it *.png"),
                          (None, "--plot draws a --combine'd comparison; give --combine")):
        monkeypatch.setattr("sys.argv", ["repair_compare", *(["--combine", *argv] if argv else
                                                             ["--plot", str(tmp_path / "x.png")])])
        with pytest.raises(SystemExit) as exit_:
            repair_compare.main()
        err = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 2 and message in err[-1]
    assert not list(tmp_path.glob("x.*"))
