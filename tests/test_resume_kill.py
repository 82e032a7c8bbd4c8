"""Resume after a real SIGKILL of a ``seftkit repair`` child process, bit-exact; bad checkpoints refused in one line.

Every repair here is a child process started with the same environment (one thread), so the uninterrupted run
and the killed-then-resumed one do the same float arithmetic in the same order and must agree bit for bit.
The killed child is held at a chosen point (the start of step ``HOLD_AT``, with a checkpoint on disk and one more
step run in memory; or halfway through writing its second checkpoint) and says so with a file, so the kill
always lands there before the run can finish, whatever the load; the test polls for that file and never times
anything.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_model
from safetensors.torch import load_file

from seftkit.cli.main import cli
from seftkit.prune import prune_checkpoint
from seftkit.repair import REPORT_NAME, RepairConfig, checkpoint_dir_for, repair_checkpoint
from seftkit.repair.checkpoint import STATE_FILE
from seftkit.sparsity.pattern import parse_pattern

STEPS, EVERY, HOLD_AT = 6, 2, 3  # checkpoints after steps 2 and 4
CHILD_DEADLINE_S = 300  # a safety net for a hung child, not a timing assertion

# The real CLI in a child. --hold-at STEP blocks (no CPU) when step STEP starts; --hold-in-save N blocks inside
# the N-th checkpoint write, with half the file written. Either way it touches --held first, then waits for a kill.
CHILD = """
import pathlib, signal, sys, torch
from seftkit.repair import trainer
args, mode = sys.argv[1:], None
if args[0].startswith("--hold"):
    mode, count, held, args = args[0], int(args[1]), pathlib.Path(args[2]), args[3:]
def hold():
    held.touch()
    signal.pause()
if mode == "--hold-at":
    rate = trainer.learning_rate
    def held_rate(config, step):
        if step == count:
            hold()
        return rate(config, step)
    trainer.learning_rate = held_rate
elif mode == "--hold-in-save":
    save, calls = torch.save, []
    def torn_save(obj, f, *a, **k):
        calls.append(f)
        save(obj, f, *a, **k)
        if len(calls) == count:
            data = pathlib.Path(f).read_bytes()
            pathlib.Path(f).write_bytes(data[: len(data) // 2])
            hold()
    torch.save = torn_save
from seftkit.cli.main import cli
cli(["repair", *args], prog_name="seftkit")
"""


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill")
    out = root / "pruned"
    prune_checkpoint(save_tiny_model(root / "tiny", "llama"), "magnitude", parse_pattern(0.5), out=out,
                     progress=False)
    return out


def repair_args(method: str, data: Path, every: int = EVERY) -> list[str]:
    """The CLI form of :func:`small_config` (options given twice: click keeps the last)."""
    evolution = ["--update-interval", "2", "--accumulation-steps", "1"] if method.startswith("seft") else []
    return ["--method", method, "--data", str(data), "--steps", str(STEPS), "--batch-size", "2", "--seqlen", "32",
            "--lr", "1e-2", "--lora-rank-equivalent", "2", *evolution, "--device", "cpu",
            "--checkpoint-every", str(every)]


def child(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def finish(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=CHILD_DEADLINE_S)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def kill_once_held(process: subprocess.Popen, held: Path) -> None:
    """SIGKILL the child once it says it is held (polling, with a deadline only against a hung child)."""
    deadline = time.monotonic() + CHILD_DEADLINE_S
    try:
        while not held.exists():
            if process.poll() is not None:
                pytest.fail(f"the child ended before it was held:\n{process.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "the child was never held"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    assert process.returncode == -signal.SIGKILL


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes as integers: equal only if every bit is (``torch.equal`` calls -0.0 and 0.0 equal)."""
    return tensor.contiguous().view(torch.uint8)


@pytest.fixture(scope="module")
def uninterrupted(pruned_dir, tiny_text_file, tmp_path_factory) -> Path:
    """The reference: the same SEFT run in a child that nothing interrupts."""
    out = tmp_path_factory.mktemp("whole") / "whole"
    finish(child(str(pruned_dir), *repair_args("seft", tiny_text_file), "--out", str(out)))
    return out


@pytest.mark.parametrize("hold", [
    ["--hold-at", str(HOLD_AT)],  # killed with a step run in memory after the checkpoint of step 2
    ["--hold-in-save", "2"],  # killed halfway through writing the checkpoint of step 4
], ids=["mid-training", "mid-checkpoint-write"])
def test_resume_after_sigkill_is_bit_exact(hold, uninterrupted, pruned_dir, tiny_text_file, tmp_path):
    """SEFT, whose resume needs every piece of state (slots, masks, candidate statistics, Adam, RNG); the
    in-process resume tests in test_repair_trainer.py cover every method the same way, bit-exact too."""
    cut, held = tmp_path / "cut", tmp_path / "held"
    kill_once_held(child(*hold, str(held), str(pruned_dir), *repair_args("seft", tiny_text_file), "--out", str(cut)),
                   held)
    assert not cut.exists()
    assert torch.load(checkpoint_dir_for(cut) / STATE_FILE, weights_only=True)["progress"]["step"] == EVERY

    finish(child(str(pruned_dir), *repair_args("seft", tiny_text_file), "--out", str(cut), "--resume"))
    resumed, whole = (json.loads((folder / REPORT_NAME).read_text()) for folder in (cut, uninterrupted))
    assert resumed["resumed_from_step"] == EVERY and whole["resumed_from_step"] is None
    assert resumed["loss_curve"] == whole["loss_curve"]  # exact floats, every step
    assert resumed["events"] == whole["events"]
    a, b = load_file(uninterrupted / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(bits(a[name]), bits(b[name]))]
    assert different == []
    assert not checkpoint_dir_for(cut).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "held"]  # no stray temporary files or folders


def run(*args) -> object:
    return CliRunner().invoke(cli, ["repair", *map(str, args)])


def assert_one_line_exit_2(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    # a warning about options the method ignores (--method static after SEFT's options) may precede the error
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: --method ")]
    assert len(lines) == 1 and lines[0].startswith("seftkit: error: "), result.stderr
    assert message in lines[0], lines[0]


def small_config(method: str, data: Path, **overrides) -> RepairConfig:
    evolution = dict(update_interval=2, accumulation_steps=1) if method.startswith("seft") else {}
    settings = dict(method=method, data=str(data), steps=STEPS, batch_size=2, seqlen=32, lr=1e-2,
                    lora_rank_equivalent=2, device="cpu", checkpoint_every=EVERY, **evolution)
    return RepairConfig(**{**settings, **overrides})


def stopped_run(model_dir: Path, config: RepairConfig, out: Path) -> Path:
    """A run stopped after its first checkpoint; returns the checkpoint folder."""
    repair_checkpoint(model_dir, config, out, progress=False, stop_after=EVERY)
    ckpt = checkpoint_dir_for(out)
    assert (ckpt / STATE_FILE).is_file()
    return ckpt


def damage(state: Path, how: str) -> None:
    data = state.read_bytes()
    if how == "truncated":
        state.write_bytes(data[: len(data) // 2])
    elif how == "garbled":
        state.write_bytes(data[:64] + bytes(b ^ 0x5A for b in data[64:]))
    elif how == "not a checkpoint":
        torch.save({"hello": torch.zeros(2)}, state)
    else:  # empty
        state.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "garbled", "not a checkpoint", "empty"])
def test_a_damaged_checkpoint_is_one_line_exit_2(how, pruned_dir, tiny_text_file, tmp_path):
    out = tmp_path / "out"
    ckpt = stopped_run(pruned_dir, small_config("seft", tiny_text_file), out)
    damage(ckpt / STATE_FILE, how)
    result = run(pruned_dir, *repair_args("seft", tiny_text_file), "--out", out, "--resume")
    assert_one_line_exit_2(result, f"cannot read checkpoint {ckpt}")
    assert not out.exists()


@pytest.fixture(scope="module")
def other_models(pruned_dir, tmp_path_factory) -> dict[str, Path]:
    """A model of another shape (GPT-2) and one of the same shapes pruned differently."""
    root = tmp_path_factory.mktemp("others")
    gpt2 = root / "gpt2"
    prune_checkpoint(save_tiny_model(root / "tiny-gpt2", "gpt2"), "magnitude", parse_pattern(0.5), out=gpt2,
                     progress=False)
    repruned = root / "llama-70"
    prune_checkpoint(pruned_dir, "magnitude", parse_pattern(0.7), out=repruned, progress=False)
    return {"other shapes": gpt2, "same shapes, other weights": repruned}


@pytest.mark.parametrize("model", ["other shapes", "same shapes, other weights"])
@pytest.mark.parametrize("method", ["seft", "static", "lora-prune"])
def test_a_checkpoint_of_another_model_is_one_line_exit_2(model, method, other_models, pruned_dir, tiny_text_file,
                                                         tmp_path):
    out = tmp_path / "out"
    stopped_run(pruned_dir, small_config(method, tiny_text_file), out)
    result = run(other_models[model], *repair_args(method, tiny_text_file), "--out", out,
                 "--resume")
    assert_one_line_exit_2(result, "was made for another model")
    assert not out.exists()


@pytest.mark.parametrize(("option", "value", "field"), [
    ("--method", "seft-no-revive", "method"), ("--method", "static", "method"), ("--lr", "0.5", "lr"),
    ("--steps", "8", "steps"), ("--seed", "1", "seed"),
])
def test_a_checkpoint_made_with_other_settings_is_one_line_exit_2(option, value, field, pruned_dir, tiny_text_file,
                                                                  tmp_path):
    out = tmp_path / "out"
    stopped_run(pruned_dir, small_config("seft", tiny_text_file), out)
    result = run(pruned_dir, *repair_args("seft", tiny_text_file), option, value, "--out", out, "--resume")
    assert_one_line_exit_2(result, "was made with different settings (")
    assert field in result.stderr
    assert not out.exists()


def test_runtime_options_may_change_on_resume(pruned_dir, tiny_text_file, tmp_path):
    out = tmp_path / "out"
    stopped_run(pruned_dir, small_config("static", tiny_text_file), out)
    result = run(pruned_dir, *repair_args("static", tiny_text_file, every=3), "--out", out,
                 "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / REPORT_NAME).read_text())["resumed_from_step"] == EVERY
    shutil.rmtree(out)
