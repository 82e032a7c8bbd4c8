"""The repair bench's --reuse: only baselines, only from an earlier run with the same shared settings."""

from __future__ import annotations

import argparse
import json

import pytest

from seftkit.bench.repair_compare import SHARED_SETTINGS, reusable_runs, reused_run

SETTINGS = dict(model="smollm2-135m", sparsity=0.7, calib_samples=32, steps=100, batch_size=4, seqlen=128,
                lora_rank_equivalent=8, warmup_steps=0, max_grad_norm=None, gradient_checkpointing=False,
                eval_seqlen=512, eval_windows=40, eval_tasks="piqa,arc_easy", eval_limit=200, seed=0)


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


def test_refuses_an_earlier_run_with_other_shared_settings(tmp_path):
    with pytest.raises(ValueError, match="differ in steps, seed"):
        reusable_runs(_earlier(tmp_path, steps=40, seed=1), argparse.Namespace(**SETTINGS))
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
    with pytest.raises(ValueError, match="differ in warmup_steps, max_grad_norm"):
        reusable_runs(path, argparse.Namespace(**{**SETTINGS, "warmup_steps": 10, "max_grad_norm": 1.0}))


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a positive number"),
    (["--methods", "seft", "--drop-rate", "2"], "--drop-rate must be in"),
    (["--extra-seeds", "1,x"], "--extra-seeds '1,x': expected comma-separated integers"),
    (["--extra-seeds", "0,1"], "--extra-seeds must be distinct and differ from --seed"),
])
def test_bad_repair_settings_stop_the_bench_before_any_work(flags, message, tmp_path, monkeypatch, capsys):
    from seftkit.bench import repair_compare

    monkeypatch.setattr("sys.argv", ["repair_compare", *flags, "--workdir", str(tmp_path / "work")])
    with pytest.raises(SystemExit) as exit_info:
        repair_compare.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_extra_seed_runs_of_baselines_are_reused_by_seed_and_never_for_seft(tmp_path):
    from seftkit.bench.repair_compare import reused_seed_run

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
    from seftkit.bench.repair_compare import format_seeds

    best = {"seft": {"test_ppl": 80.0, "seeds": [{"seed": 1, "test_ppl": 90.0}, {"seed": 2, "test_ppl": 100.0},
                                                 {"seed": 3, "test_ppl": float("nan")}]},
            "static": {"test_ppl": 70.0}, "lora-prune": None}
    lines = format_seeds({"test_ppl": 40.0}, {"test_ppl": 790.0}, best, seed=0)
    assert len(lines) == 3  # a title and seft's row; static ran one seed only, lora-prune failed
    assert "mean    90.00 +- 10.00" in lines[2] and "gap closed  93.3%" in lines[2]
    assert "(0: 80.00, 1: 90.00, 2: 100.00)  failed seeds: 3" in lines[2]
    assert format_seeds({"test_ppl": 40.0}, {"test_ppl": 790.0}, {"static": {"test_ppl": 70.0}}, seed=0) == []


def test_seed_summary_pairs_every_method_with_seft_seed_by_seed():
    from seftkit.bench.repair_compare import format_seeds

    best = {"seft": {"test_ppl": 80.0, "seeds": [{"seed": 1, "test_ppl": 90.0}, {"seed": 2, "test_ppl": 100.0}]},
            "masked-lora": {"test_ppl": 82.0, "seeds": [{"seed": 1, "test_ppl": 94.0},
                                                        {"seed": 2, "error": "loss is nan"}]}}
    lines = format_seeds({"test_ppl": 40.0}, {"test_ppl": 790.0}, best, seed=0)
    assert "same seeds" not in lines[2]
    assert "seft minus this, same seeds:    -3.00 +-  1.41 (n=2)" in lines[3]  # seeds 0 and 1: -2, -4


def test_combine_prints_parts_of_one_protocol_as_one_comparison(tmp_path, monkeypatch, capsys):
    from seftkit.bench import repair_compare

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

    with pytest.raises(ValueError, match="seft is in two of the files"):
        repair_compare.combined_results([tmp_path / "b.json", tmp_path / "c.json"])
    other = {**base, "args": {**base["args"], "update_interval": "20"}, "sweep": {}}
    (tmp_path / "d.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="differ from .*a.json's in update_interval"):
        repair_compare.combined_results([tmp_path / "a.json", tmp_path / "d.json"])
    with pytest.raises(ValueError, match="not a readable"):
        repair_compare.combined_results([tmp_path / "a.json", tmp_path / "missing.json"])
    with pytest.raises(ValueError, match="needs at least one"):
        repair_compare.combined_results([])
