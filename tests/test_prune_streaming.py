"""``prune --low-memory``: one decoder block resident at a time, and exactly the in-memory path's weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_prune import make_other_family

from seftkit.cli.main import cli
from seftkit.errors import SeftkitError
from seftkit.prune import PRUNERS, prune_checkpoint
from seftkit.prune.streaming import StreamedCheckpoint
from seftkit.sparsity.pattern import parse_pattern
from seftkit.sparsity.scanner import checkpoint_files


def state(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(folder):
        tensors.update(load_file(path))
    return tensors


def prune_both(src: Path, tmp: Path, text: Path, method: str, pattern: str = "0.5") -> tuple[Path, Path]:
    parsed = parse_pattern(nm=pattern) if ":" in pattern else parse_pattern(float(pattern))
    outs = []
    for low_memory in (False, True):
        out = tmp / f"{method}-{low_memory}"
        prune_checkpoint(src, method, parsed, out=out, calib=str(text), nsamples=5, seqlen=32, batch_size=2,
                         device="cpu", progress=False, low_memory=low_memory)
        outs.append(out)
    return outs[0], outs[1]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_streamed_output_is_bit_identical(tiny_model_dir, tiny_text_file, tmp_path, method):
    memory, streamed = prune_both(tiny_model_dir, tmp_path, tiny_text_file, method)
    assert_same_weights(memory, streamed)
    reports = [json.loads((out / "prune_report.json").read_text()) for out in (memory, streamed)]
    assert reports[0]["tensors"] == reports[1]["tensors"] and [r["low_memory"] for r in reports] == [False, True]
    config = [json.loads((out / "config.json").read_text()) for out in (memory, streamed)]
    assert config[0] == config[1]


@pytest.mark.parametrize("family,method", [("gemma3_text", "wanda"), ("gpt_neox", "sparsegpt")])
def test_streamed_other_families_and_nm(family, method, tiny_text_file, tmp_path):
    from conftest import make_tokenizer

    model, _ = make_other_family(family)
    src = tmp_path / family
    model.save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    memory, streamed = prune_both(src, tmp_path, tiny_text_file, method, "2:4")
    assert_same_weights(memory, streamed)


def test_only_one_block_is_ever_resident(llama_dir, tiny_text_file, tmp_path, monkeypatch):
    """Each load finds every other block's weights on the meta device, and the non-block ones gone after the
    calibration capture."""
    seen = []
    load = StreamedCheckpoint.load

    def checked_load(self, index):
        layers = self.model.get_submodule(self.layers_name)
        resident = [i for i, block in enumerate(layers) if not any(p.is_meta for p in block.parameters())]
        seen.append((index, resident, self.model.get_input_embeddings().weight.is_meta))
        load(self, index)

    monkeypatch.setattr(StreamedCheckpoint, "load", checked_load)
    prune_checkpoint(llama_dir, "wanda", parse_pattern(0.5), out=tmp_path / "out", calib=str(tiny_text_file),
                     nsamples=4, seqlen=32, device="cpu", progress=False, low_memory=True)
    assert seen == [(0, [], False), (1, [], True)]  # block 0 before the capture, block 1 after block 0 left


def test_missing_or_foreign_tensors_are_refused(llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SeftkitError, match="no tensor for block 1's mlp.up_proj.weight"):
        prune_checkpoint(broken, "magnitude", parse_pattern(0.5), out=tmp_path / "o1", low_memory=True)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 32)
    tensors["something.else"] = torch.zeros(2)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SeftkitError, match="something.else does not match the model's names"):
        prune_checkpoint(broken, "magnitude", parse_pattern(0.5), out=tmp_path / "o2", low_memory=True)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_nan_in_a_late_block_writes_nothing(llama_dir, tmp_path):
    broken = tmp_path / "nan"
    shutil.copytree(llama_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(cli, ["prune", str(broken), "--method", "magnitude", "--sparsity", "0.5",
                                      "--low-memory", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "o_proj.weight contains NaN" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_low_memory_writes_a_loadable_sharded_folder(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["prune", str(llama_dir), "--method", "magnitude", "--sparsity", "0.5",
                                      "--low-memory", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(checkpoint_files(out)) == 3  # two blocks and the rest
    model = AutoModelForCausalLM.from_pretrained(out)
    assert float((model.model.layers[1].mlp.up_proj.weight == 0).float().mean()) == 0.5
