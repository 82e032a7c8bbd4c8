"""``seftkit repair`` end to end: a loadable sparse folder and report, resume, one-line errors, nothing half-written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from seftkit.cli.main import cli
from seftkit.models import linear_weight, target_linears
from seftkit.prune import prune_checkpoint
from seftkit.repair import REPORT_NAME, RepairConfig, checkpoint_dir_for, repair_checkpoint
from seftkit.sparsity.pattern import parse_pattern


@pytest.fixture(scope="module")
def pruned_dir(llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "llama-50"
    prune_checkpoint(llama_dir, "magnitude", parse_pattern(0.5), out=out, progress=False)
    return out


def run(*args: str):
    return CliRunner().invoke(cli, ["repair", *map(str, args)])


def train_args(data: Path) -> list[str]:
    return ["--data", data, "--steps", "4", "--batch-size", "2", "--seqlen", "32", "--lr", "1e-2",
            "--lora-rank-equivalent", "2", "--update-interval", "2", "--accumulation-steps", "1"]


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def nnz(folder: Path) -> dict[str, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return {name: int(torch.count_nonzero(linear_weight(m))) for name, m in target_linears(model).items()}


def test_repair_writes_a_plain_hf_folder_with_the_input_sparsity(pruned_dir, tiny_text_file, tmp_path):
    before = digest(pruned_dir)
    out, report_path = tmp_path / "repaired", tmp_path / "r.json"
    result = run(pruned_dir, *train_args(tiny_text_file), "--method", "seft-no-revive", "--out", out,
                 "--checkpoint-every", "2", "--json", report_path)
    assert result.exit_code == 0, result.output
    assert "method seft-no-revive: 4 steps" in result.stdout and f"wrote {out.resolve()}" in result.stdout
    assert nnz(out) == nnz(pruned_dir)
    assert digest(pruned_dir) == before  # the input is only read
    report = json.loads((out / REPORT_NAME).read_text())
    assert report == json.loads(report_path.read_text())
    assert report["trainable_params"] == 2 * 2 * 512  # rank 2 x (in + out summed over 7 linears) x 2 blocks
    assert len(report["loss_curve"]) == 4 and report["sparsity_after"] == pytest.approx(0.5)
    assert not checkpoint_dir_for(out).exists()  # removed once the output is complete


def test_resume_after_a_kill_gives_the_uninterrupted_output(pruned_dir, tiny_text_file, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run(pruned_dir, *train_args(tiny_text_file), "--out", whole).exit_code == 0
    config = RepairConfig(method="seft", data=str(tiny_text_file), steps=4, batch_size=2, seqlen=32, lr=1e-2,
                          lora_rank_equivalent=2, update_interval=2, accumulation_steps=1, checkpoint_every=1)
    repair_checkpoint(pruned_dir, config, cut, progress=False, stop_after=3)  # a kill after step 3
    assert not cut.exists() and (checkpoint_dir_for(cut) / "state.pt").is_file()
    result = run(pruned_dir, *train_args(tiny_text_file), "--out", cut, "--checkpoint-every", "1", "--resume")
    assert result.exit_code == 0, result.output
    report = json.loads((cut / REPORT_NAME).read_text())
    assert report["resumed_from_step"] == 3
    from safetensors.torch import load_file

    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    for name, tensor in a.items():  # bit-exact: the same arithmetic in the same order
        assert torch.equal(b[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_divergence_is_one_line_and_keeps_the_last_good_checkpoint(pruned_dir, tiny_text_file, tmp_path):
    out = tmp_path / "diverged"
    result = run(pruned_dir, *train_args(tiny_text_file), "--method", "static", "--lr", "1e30", "--out", out,
                 "--checkpoint-every", "1")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("seftkit: error: loss became nan at step 1; try a lower --lr (the last good checkpoint")
    assert not out.exists() and (checkpoint_dir_for(out) / "state.pt").is_file()
    assert not list(tmp_path.glob(".diverged.tmp-*"))


@pytest.mark.parametrize(("extra", "message"), [
    (["--delta-density", "0.1", "--lora-rank-equivalent", "4"], "either --delta-density or --lora-rank-equivalent"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--nm", "2:4"], "is not 2:4 sparse; prune with --nm 2:4"),
    (["--eval-tasks", "piqa,nope"], "unknown task nope"),
    (["--data", "/nonexistent/corpus.txt"], "data /nonexistent/corpus.txt does not exist"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(extra, message, pruned_dir, tiny_text_file, tmp_path):
    out = tmp_path / "out"
    result = run(pruned_dir, *train_args(tiny_text_file), *extra, "--out", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("seftkit: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_missing_model_and_existing_output(pruned_dir, tiny_text_file, tmp_path):
    result = run(tmp_path / "nope", *train_args(tiny_text_file), "--out", tmp_path / "a")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    (tmp_path / "taken").mkdir()
    result = run(pruned_dir, *train_args(tiny_text_file), "--out", tmp_path / "taken")
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.stderr
    result = run(pruned_dir, *train_args(tiny_text_file), "--out", pruned_dir, "--overwrite")
    assert result.exit_code == 2 and "is the input model" in result.stderr


def test_eval_windows_caps_the_perplexity_windows(tmp_path, tiny_text_file):
    from conftest import save_tiny_model

    from seftkit.eval import evaluate
    from seftkit.models import load_model

    model_dir = tmp_path / "m"
    save_tiny_model(model_dir, "llama")
    model, tokenizer = load_model(str(model_dir))
    texts = [Path(tiny_text_file).read_text()] * 20
    full = evaluate(model, tokenizer, ppl_texts=texts, seqlen=16, progress=False).ppl
    capped = evaluate(model, tokenizer, ppl_texts=texts, seqlen=16, progress=False, ppl_windows=3).ppl
    assert full.windows > 3 and capped.windows == 3
    result = CliRunner().invoke(cli, ["repair", str(model_dir), "--eval-windows", "0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--eval-windows must be at least 1, got 0" in result.stderr
