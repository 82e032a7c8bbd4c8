"""Multi-process prune and repair on torch.distributed: 2 CPU processes over gloo, launched by torchrun.

One torchrun launch of this file (see ``worker`` at the bottom) runs every distributed scenario on tiny models
and is then killed mid-repair; a second launch resumes that run through the real ``seftkit repair`` CLI. The
tests compare what the ranks recorded with each other and with single-process runs of the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model

from seftkit.distributed import check_same_across_ranks, init_distributed, tensor_digest
from seftkit.errors import SeftkitError
from seftkit.models import linear_weight, load_model, target_linears
from seftkit.prune import prune_checkpoint
from seftkit.repair import RepairConfig, repair_checkpoint, trainer
from seftkit.repair.seft import SeftMethod
from seftkit.sparsity.pattern import parse_pattern

PROCESSES = 2
PER_RANK_BATCH = 2
KILL_AT_STEP = 5  # the killed run's last checkpoint holds step 4
PRUNES = {"wanda": parse_pattern(0.5), "sparsegpt": parse_pattern(None, "2:4")}
REPAIR = dict(method="seft", steps=8, grad_accum=2, seqlen=32, lr=1e-2, lora_rank_equivalent=2, update_interval=2,
              accumulation_steps=2, device="cpu")
CLI_RESUME = ["--steps", "8", "--grad-accum", "2", "--seqlen", "32", "--lr", "1e-2", "--lora-rank-equivalent", "2",
              "--update-interval", "2", "--accumulation-steps", "2", "--device", "cpu", "--batch-size",
              str(PER_RANK_BATCH), "--checkpoint-every", "2", "--resume"]


def repair_config(data: Path, batch_size: int, **overrides) -> RepairConfig:
    return RepairConfig(**{**REPAIR, "data": str(data), "batch_size": batch_size, **overrides})


def prune(model_dir: Path, data: Path, method: str, out: Path) -> None:
    prune_checkpoint(model_dir, method, PRUNES[method], out=out, calib=str(data), nsamples=6, seqlen=32,
                     device="cpu", batch_size=2, progress=False)


def record_topology(log: list[dict[str, list[str]]]) -> None:
    """Make SEFT append a digest of every layer's slots and active set to ``log`` after each update."""
    original = SeftMethod.after_optimizer_step

    def after_optimizer_step(self: SeftMethod, step: int, optimizer: torch.optim.Optimizer):
        event = original(self, step, optimizer)
        if event is not None:
            log.append({layer.name: [tensor_digest(layer.module.indices), tensor_digest(layer.module.active)]
                        for layer in self.layers})
        return event

    SeftMethod.after_optimizer_step = after_optimizer_step


def launch(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(PROCESSES),
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(str(folder), device="cpu")
    return {name: linear_weight(m).detach().clone() for name, m in target_linears(model).items()}


def assert_same_masks_close_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.equal(got[name] != 0, weight != 0), name
        torch.testing.assert_close(got[name], weight, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_text_file):
    """The torchrun launch (then killed), the CLI resume launch, and the single-process references."""
    root = tmp_path_factory.mktemp("dist")
    model_dir = save_tiny_model(root / "tiny", "llama")
    prune_checkpoint(model_dir, "magnitude", parse_pattern(0.5), out=root / "pruned", progress=False)
    killed = launch(__file__, str(root), str(tiny_text_file))
    resumed = launch("-m", "seftkit.cli.main", "repair", str(root / "pruned"), "--data", str(tiny_text_file),
                     "--out", str(root / "cut"), "--json", str(root / "cut.json"), *CLI_RESUME)
    for method in PRUNES:
        prune(model_dir, tiny_text_file, method, root / f"{method}-1")
    topology: list[dict[str, list[str]]] = []
    original = SeftMethod.after_optimizer_step
    record_topology(topology)
    try:
        repair_checkpoint(root / "pruned", repair_config(tiny_text_file, PER_RANK_BATCH * PROCESSES),
                          root / "seft-1", progress=False)
    finally:
        SeftMethod.after_optimizer_step = original
    return {"root": root, "killed": killed, "resumed": resumed, "topology": topology}


def rank_record(runs, rank: int) -> dict:
    path = runs["root"] / f"rank{rank}.json"
    assert path.is_file(), runs["killed"].stderr[-3000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("method", list(PRUNES))
def test_distributed_prune_equals_single_process_prune(runs, method):
    root = runs["root"]
    assert_same_masks_close_weights(weights(root / f"{method}-2"), weights(root / f"{method}-1"))
    report = json.loads((root / f"{method}-2" / "prune_report.json").read_text())
    assert report["calibration"]["nsamples"] == 6  # the windows were shared, not each rank's own


def test_seft_topology_identical_on_every_rank_and_to_one_process_after_every_update(runs):
    ranks = [rank_record(runs, rank)["topology"] for rank in range(PROCESSES)]
    assert len(runs["topology"]) == 3  # updates after steps 1, 3 and 5 of 8
    assert all(topology == runs["topology"] for topology in ranks)


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    root = runs["root"]
    assert_same_masks_close_weights(weights(root / "seft-2"), weights(root / "seft-1"))
    two = json.loads((root / "seft-2" / "seft_report.json").read_text())
    one = json.loads((root / "seft-1" / "seft_report.json").read_text())
    assert (two["processes"], two["global_batch_size"]) == (2, PER_RANK_BATCH * PROCESSES * REPAIR["grad_accum"])
    assert (one["processes"], one["global_batch_size"]) == (1, two["global_batch_size"])
    assert [loss for _, loss in two["loss_curve"]] == pytest.approx([loss for _, loss in one["loss_curve"]],
                                                                    rel=1e-4)
    assert two["method_summary"]["updates"] == one["method_summary"]["updates"]


def test_ranks_that_disagree_fail_naming_the_first_differing_tensor(runs):
    for rank in range(PROCESSES):
        message = rank_record(runs, rank)["mismatch"]
        assert message.startswith("ranks disagree on a test: differs differs between rank")


def test_a_killed_distributed_run_resumes_from_the_cli(runs):
    root = runs["root"]
    assert runs["killed"].returncode != 0  # both ranks died at the start of step 5
    resumed = runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("method seft: 8 steps") == 1  # rank 0 reports, once
    assert "2 processes, global batch 8 windows per step (2 per process x 2 x 2 grad-accum)" in resumed.stdout
    report = json.loads((root / "cut.json").read_text())
    assert report["resumed_from_step"] == 4
    assert not (root / "cut.ckpt").exists()
    assert_same_masks_close_weights(weights(root / "cut"), weights(root / "seft-2"))
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no stray temporary folders


def test_check_same_across_ranks_is_a_no_op_in_one_process(monkeypatch):
    """Nothing to compare with: no collective is issued (one would hang or fail without a process group)."""
    from seftkit import distributed

    def no_collectives(*args, **kwargs):
        raise AssertionError("a collective was issued in a single process")

    monkeypatch.setattr(distributed.dist, "all_gather_object", no_collectives)
    assert not distributed.world().distributed
    assert check_same_across_ranks("anything", {"x": torch.arange(3)}) is None
    monkeypatch.setattr(distributed, "_WORLD", distributed.World(world_size=2))  # what keeps it from gathering
    with pytest.raises(AssertionError, match="a collective was issued"):
        check_same_across_ranks("anything", {"x": torch.arange(3)})


def worker(root: Path, data: Path) -> None:
    """One rank of the torchrun launch: every scenario, then a run killed mid-training (``os._exit``)."""
    torch.set_num_threads(1)
    ranks, _ = init_distributed("cpu")
    record: dict = {"topology": []}
    for method in PRUNES:
        prune(root / "tiny", data, method, root / f"{method}-2")
    record_topology(record["topology"])
    repair_checkpoint(root / "pruned", repair_config(data, PER_RANK_BATCH), root / "seft-2", progress=False)
    try:
        check_same_across_ranks("a test", {"same": torch.zeros(3), "differs": torch.full((3,), ranks.rank)})
    except SeftkitError as exc:
        record["mismatch"] = str(exc)
    (root / f"rank{ranks.rank}.json").write_text(json.dumps(record))

    learning_rate = trainer.learning_rate

    def dying_learning_rate(config: RepairConfig, step: int) -> float:
        if step == KILL_AT_STEP:
            os._exit(1)
        return learning_rate(config, step)

    trainer.learning_rate = dying_learning_rate
    repair_checkpoint(root / "pruned", repair_config(data, PER_RANK_BATCH, checkpoint_every=2), root / "cut",
                      progress=False)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
