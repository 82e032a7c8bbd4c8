"""Refusals provoked for real: a repair whose merge densifies or breaks N:M writes nothing; prune and export never
change their input folder (repair's own input check is in test_repair_cli.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_model

from seftkit.cli.main import cli
from seftkit.models import linear_weight
from seftkit.prune import prune_checkpoint
from seftkit.repair import checkpoint_dir_for
from seftkit.repair.baselines import StaticSparse
from seftkit.sparsity.pattern import parse_pattern

LAYER = "model.layers.1.mlp.down_proj"


def run(*args) -> object:
    return CliRunner().invoke(cli, list(map(str, args)))


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (names, bytes) and the folder's own listing, to show nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refusals")
    dense = save_tiny_model(root / "dense", "llama")
    out = {"dense": dense}
    for name, pattern in (("half", parse_pattern(0.5)), ("2:4", parse_pattern(None, "2:4"))):
        out[name] = root / name
        prune_checkpoint(dense, "magnitude", pattern, out=out[name], progress=False)
    return out


def repair_args(data: Path) -> list[str]:
    return ["--method", "static", "--data", data, "--steps", "2", "--batch-size", "2", "--seqlen", "16", "--lr",
            "1e-3", "--device", "cpu", "--checkpoint-every", "1"]


def sabotage_merge(monkeypatch, damage) -> None:
    """Make the static method's merge call ``damage`` on one layer's weight after its real merge."""
    attach, merge = StaticSparse.attach, StaticSparse.merge

    def recording_attach(self, model, targets) -> None:
        attach(self, model, targets)
        self.sabotaged = targets[LAYER]

    def merge_then_damage(self) -> None:
        merge(self)
        with torch.no_grad():
            damage(linear_weight(self.sabotaged))

    monkeypatch.setattr(StaticSparse, "attach", recording_attach)
    monkeypatch.setattr(StaticSparse, "merge", merge_then_damage)


def densify(weight: torch.Tensor) -> None:
    weight[weight == 0] = 1e-3


def move_one_zero(weight: torch.Tensor) -> None:
    """Same nnz, broken 2:4: fill the first zero of row 0 and zero a non-zero of the last row."""
    first_zero = int(torch.nonzero(weight[0] == 0)[0])
    weight[0, first_zero] = 1.0
    last_kept = int(torch.nonzero(weight[-1])[0])
    weight[-1, last_kept] = 0.0


@pytest.mark.parametrize(("model", "extra", "damage", "message"), [
    ("half", [], densify, f"repair left {LAYER} with 2048 non-zeros, more than its input's 1024; nothing was "
                          "written (this is a bug, please report it)"),
    ("2:4", ["--nm", "2:4"], move_one_zero, f"repair broke the 2:4 pattern of {LAYER}; nothing was written (a bug, "
                                            "please report)"),
])
def test_a_merge_that_breaks_sparsity_writes_nothing(model, extra, damage, message, models, tiny_text_file, tmp_path,
                                                     monkeypatch):
    sabotage_merge(monkeypatch, damage)
    before = folder_digest(models[model])
    out = tmp_path / "out"
    result = run("repair", models[model], *repair_args(tiny_text_file), *extra, "--out", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1] == f"seftkit: error: {message}"  # after the progress bar
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_dir_for(out).name]  # no temporary folder
    assert folder_digest(models[model]) == before


def test_prune_never_touches_its_input(models, tiny_text_file, tmp_path):
    before = folder_digest(models["dense"])
    result = run("prune", models["dense"], "--method", "wanda", "--sparsity", "0.5", "--calib", tiny_text_file,
                 "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--out", tmp_path / "pruned")
    assert result.exit_code == 0, result.output
    assert folder_digest(tmp_path / "pruned") != before  # it did write a different model
    result = run("prune", models["dense"], "--method", "magnitude", "--nm", "3:5", "--out", tmp_path / "bad")
    assert result.exit_code == 2, result.output
    assert folder_digest(models["dense"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


@pytest.mark.parametrize("fmt", ["csr", "compressed", "onnx"])
def test_export_never_touches_its_input(fmt, models, tmp_path):
    before = folder_digest(models["half"])
    result = run("export", models["half"], "--format", fmt, "--out", tmp_path / "exported")
    assert result.exit_code == 0, result.output
    assert any((tmp_path / "exported").iterdir())
    result = run("export", models["half"], "--format", fmt, "--out", models["half"], "--overwrite")
    assert result.exit_code == 2 and "is the input model" in result.stderr
    assert folder_digest(models["half"]) == before
