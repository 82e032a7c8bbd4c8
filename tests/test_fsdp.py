"""Repair with FSDP2 (``--strategy fsdp``): 2 CPU processes over gloo, launched by torchrun and by accelerate.

One torchrun launch of this file (``worker`` at the bottom) runs every sharded scenario on tiny models, plus the
same SEFT runs under DDP; one ``accelerate launch --use_fsdp`` runs the real CLI. The tests compare the outputs
with each other and with single-process runs of the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_model
from test_distributed import PER_RANK_BATCH, PROCESSES, assert_same_masks_close_weights, launch, weights

from seftkit.cli.main import cli
from seftkit.distributed import init_distributed
from seftkit.errors import SeftkitError
from seftkit.prune import prune_checkpoint
from seftkit.repair import RepairConfig, repair_checkpoint, trainer
from seftkit.repair.config import resolve_strategy
from seftkit.sparsity.pattern import parse_pattern
from seftkit.verify import verify_model

REPAIR = dict(steps=6, grad_accum=2, seqlen=32, lr=1e-2, lora_rank_equivalent=2, update_interval=2,
              accumulation_steps=2, device="cpu")
# output folder -> (family, method, strategy). GPT-2 (Conv1D weights, tied embeddings) trains with dropout, whose
# random draws depend on how the batch is split, so it is compared with DDP; the others also run in one process.
RUNS = {"seft": ("llama", "seft", "fsdp"), "seft-ddp": ("llama", "seft", "ddp"), "gpt2": ("gpt2", "seft", "fsdp"),
        "gpt2-ddp": ("gpt2", "seft", "ddp"), "lora": ("llama", "masked-lora", "fsdp")}
ONE_PROCESS = ("seft", "lora")
CLI = ["--steps", "6", "--grad-accum", "2", "--seqlen", "32", "--lr", "1e-2", "--lora-rank-equivalent", "2",
       "--update-interval", "2", "--accumulation-steps", "2", "--device", "cpu", "--batch-size", str(PER_RANK_BATCH)]


def config(root: Path, data: Path, batch_size: int, name: str, **overrides) -> RepairConfig:
    """Run ``name`` of RUNS; the Llama runs also measure perplexity before and after on ``root/eval.txt`` (a
    sharded evaluation runs on every rank), masked-lora with activation checkpointing."""
    family, method, strategy = RUNS[name]
    extra = {"eval_ppl": str(root / "eval.txt")} if family == "llama" else {}
    if method == "masked-lora":
        extra["gradient_checkpointing"] = True
    return RepairConfig(**{**REPAIR, "data": str(data), "batch_size": batch_size, "method": method,
                           "strategy": strategy, **extra, **overrides})


def accelerate_launch(*args: str) -> subprocess.CompletedProcess:
    """``accelerate launch --use_fsdp``: on a CPU-only machine it starts torchrun with ACCELERATE_USE_FSDP set."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", str(PROCESSES),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", *args]
    # accelerate's multi-GPU launcher sets FSDP_CPU_RAM_EFFICIENT_LOADING=true by default (its CPU launcher does
    # not), which makes transformers load real weights on rank 0 only: set it as a GPU host would
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_text_file):
    """The torchrun launch, the accelerate launch of the CLI, and the single-process references."""
    root = tmp_path_factory.mktemp("fsdp")
    for family in ("llama", "gpt2"):
        save_tiny_model(root / f"{family}-tiny", family)
        prune_checkpoint(root / f"{family}-tiny", "magnitude", parse_pattern(0.5), out=root / f"{family}-pruned",
                         progress=False)
    (root / "eval.txt").write_text(tiny_text_file.read_text()[:2000])
    launched = launch(__file__, str(root), str(tiny_text_file))
    accelerated = accelerate_launch("seftkit.cli.main", "repair", str(root / "llama-pruned"), "--data",
                                    str(tiny_text_file), "--out", str(root / "accelerate"), "--json",
                                    str(root / "accelerate.json"), *CLI)
    for name in ONE_PROCESS:
        one_process = config(root, tiny_text_file, PER_RANK_BATCH * PROCESSES, name)
        repair_checkpoint(root / f"{RUNS[name][0]}-pruned", one_process, root / f"{name}-1", progress=False)
    return {"root": root, "launched": launched, "accelerated": accelerated}


def rank_record(runs, rank: int) -> dict:
    path = runs["root"] / f"rank{rank}.json"
    assert path.is_file(), runs["launched"].stderr[-5000:]
    return json.loads(path.read_text())


def report(folder: Path) -> dict:
    return json.loads((folder / "seft_report.json").read_text())


def test_fsdp_shards_the_frozen_weights_and_keeps_the_trainable_state_whole(runs):
    for rank in range(PROCESSES):
        shares = rank_record(runs, rank)["shares"]
        assert set(shares) == {"seft", "gpt2", "lora", "resumed"}
        for local, total, replicated in shares.values():
            assert local == pytest.approx(total / PROCESSES, rel=0.02)  # this rank's half of every matrix
            assert replicated > 0


def losses(folder: Path) -> list[float]:
    return [loss for _, loss in report(folder)["loss_curve"]]


def assert_same_run(folder: Path, reference: Path) -> None:
    """Same masks, weights to tolerance, same loss curve and (SEFT) the same topology updates."""
    assert_same_masks_close_weights(weights(folder), weights(reference))
    got, expected = report(folder), report(reference)
    assert got["global_batch_size"] == expected["global_batch_size"] == PER_RANK_BATCH * PROCESSES * 2
    assert losses(folder) == pytest.approx(losses(reference), rel=1e-4)
    assert got["sparsity_after"] == expected["sparsity_after"]
    for when in ("eval_before", "eval_after"):
        assert got[when] == pytest.approx(expected[when], rel=1e-4)
    for key in ("updates", "revived_weights", "layers"):
        assert got["method_summary"].get(key) == expected["method_summary"].get(key)


@pytest.mark.parametrize("name", ONE_PROCESS)
def test_fsdp_trains_like_one_process_with_the_same_global_batch(runs, name):
    assert_same_run(runs["root"] / name, runs["root"] / f"{name}-1")
    assert (report(runs["root"] / name)["processes"], report(runs["root"] / name)["config"]["strategy"]) == (2, "fsdp")


@pytest.mark.parametrize("name", ["seft", "gpt2"])
def test_fsdp_and_ddp_give_the_same_model(runs, name):
    assert_same_run(runs["root"] / name, runs["root"] / f"{name}-ddp")
    assert report(runs["root"] / f"{name}-ddp")["config"]["strategy"] == "ddp"


def test_fsdp_outputs_are_ordinary_verified_hf_folders_written_by_rank_0_only(runs):
    root = runs["root"]
    for name in (*RUNS, "resumed"):
        assert verify_model(str(root / name), parse_pattern(0.5)).passed, name
    config = json.loads((root / "gpt2" / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    saved = [rank_record(runs, rank)["saved"] for rank in range(PROCESSES)]
    assert sorted(saved[0]) == sorted([*RUNS, "resumed"]) and saved[1] == []
    assert not [p.name for p in root.iterdir() if p.name.startswith(".") or p.name.endswith(".ckpt")]


def test_a_stopped_fsdp_run_resumes_from_its_checkpoint(runs):
    root = runs["root"]
    resumed = report(root / "resumed")
    assert resumed["resumed_from_step"] == 4
    assert_same_masks_close_weights(weights(root / "resumed"), weights(root / "seft"))
    assert losses(root / "resumed") == pytest.approx(losses(root / "seft"), rel=1e-5)


def test_accelerate_launch_with_fsdp_runs_the_cli_on_two_sharded_ranks(runs):
    root = runs["root"]
    accelerated = runs["accelerated"]
    assert accelerated.returncode == 0, accelerated.stderr[-3000:]
    assert accelerated.stdout.count("method seft: 6 steps") == 1  # rank 0 reports, once
    result = json.loads((root / "accelerate.json").read_text())
    assert (result["processes"], result["config"]["strategy"]) == (2, "fsdp")
    assert_same_masks_close_weights(weights(root / "accelerate"), weights(root / "seft"))


@pytest.mark.parametrize("method", ["static", "lora-prune"])
def test_methods_that_train_or_merge_whole_weights_are_refused_with_fsdp(llama_dir, tmp_path, method):
    result = CliRunner().invoke(cli, ["repair", str(llama_dir), "--method", method, "--strategy", "fsdp",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"seftkit: error: --method {method} cannot run sharded: ")
    assert line.endswith("; use --strategy ddp (fsdp runs seft, seft-no-revive and masked-lora)")
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_an_accelerate_fsdp_launch_selects_fsdp(monkeypatch):
    assert resolve_strategy(None) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolve_strategy(None) == "fsdp"
    assert resolve_strategy("ddp") == "ddp"
    with pytest.raises(SeftkitError, match="--method static cannot run sharded"):
        RepairConfig(method="static")


def worker(root: Path, data: Path) -> None:
    """One rank of the torchrun launch: the sharded runs, the DDP run, and an FSDP run stopped then resumed."""
    from transformers import PreTrainedModel

    torch.set_num_threads(1)
    ranks, _ = init_distributed("cpu")
    record: dict = {"shares": {}, "saved": []}
    current = {"name": ""}
    shard_model = trainer.shard_model

    def recording_shard_model(model, replicated, device):
        shard_model(model, replicated, device)
        local = sum(p.to_local().numel() for p in model.parameters() if hasattr(p, "to_local"))
        total = sum(p.numel() for p in model.parameters() if hasattr(p, "to_local"))
        record["shares"][current["name"]] = [local, total, sum(p.numel() for p in replicated)]

    save_pretrained = PreTrainedModel.save_pretrained

    def recording_save_pretrained(self, out, *args, **kwargs):
        record["saved"].append(current["name"])
        return save_pretrained(self, out, *args, **kwargs)

    trainer.shard_model = recording_shard_model
    PreTrainedModel.save_pretrained = recording_save_pretrained
    for name, (family, _, _) in RUNS.items():
        current["name"] = name
        repair_checkpoint(root / f"{family}-pruned", config(root, data, PER_RANK_BATCH, name), root / name,
                          progress=False)
    current["name"] = "resumed"
    stopped = config(root, data, PER_RANK_BATCH, "seft", checkpoint_every=2, eval_ppl=None)
    repair_checkpoint(root / "llama-pruned", stopped, root / "resumed", progress=False, stop_after=4)
    repair_checkpoint(root / "llama-pruned", stopped, root / "resumed", resume=True, progress=False)
    (root / f"rank{ranks.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
