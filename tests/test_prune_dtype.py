"""dtype end to end: a bf16 checkpoint stays bf16 and the same size through prune and repair, and verify passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_model

from seftkit.cli.main import cli
from seftkit.errors import SeftkitError
from seftkit.models import checkpoint_dtype, choose_dtype, linear_weight, target_linears
from seftkit.prune import PRUNERS, prune_checkpoint
from seftkit.repair import RepairConfig, repair_checkpoint
from seftkit.sparsity.pattern import parse_pattern
from seftkit.sparsity.scanner import checkpoint_files, read_checkpoint
from seftkit.verify import verify_model

HALF = parse_pattern(0.5)


def save_as(src: Path, out: Path, dtype: torch.dtype) -> Path:
    """A copy of the model folder ``src`` with its weights stored in ``dtype``."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=dtype).save_pretrained(out)
    for tok in src.glob("tokenizer*"):
        shutil.copy(tok, out)
    return out


def stored(folder: Path) -> tuple[set[str], int]:
    """(safetensors dtypes, total tensor bytes) of a model folder."""
    infos = read_checkpoint(checkpoint_files(folder))
    return {i.dtype for i in infos}, sum(i.nbytes for i in infos)


@pytest.fixture(scope="module")
def bf16_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return save_as(tiny_model_dir, tmp_path_factory.mktemp("bf16") / tiny_model_dir.name, torch.bfloat16)


def test_checkpoint_dtype_reads_config_then_safetensors(llama_dir, tmp_path):
    bf16 = save_as(llama_dir, tmp_path / "bf16", torch.bfloat16)
    assert checkpoint_dtype(llama_dir) == "fp32" and checkpoint_dtype(bf16) == "bf16"
    config = json.loads((bf16 / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "float16"  # transformers 4's key
    (bf16 / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(bf16) == "fp16"
    del config["torch_dtype"]
    (bf16 / "config.json").write_text(json.dumps(config))
    assert checkpoint_dtype(bf16) == "bf16"  # from the safetensors headers
    assert choose_dtype(bf16, "auto") == "bf16" and choose_dtype(bf16, "float32") == "fp32"
    with pytest.raises(SeftkitError, match="unknown dtype"):
        choose_dtype(bf16, "int8")


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_bf16_in_bf16_out_same_size_and_verified(bf16_dir, tiny_text_file, tmp_path, method, low_memory):
    out = tmp_path / "pruned"
    report = prune_checkpoint(bf16_dir, method, HALF, out=out, calib=str(tiny_text_file), nsamples=4, seqlen=32,
                              device="cpu", progress=False, low_memory=low_memory)
    assert report.dtype == "bfloat16"
    assert stored(out) == stored(bf16_dir)  # same dtypes, same bytes
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert verify_model(out, HALF).passed


def test_cli_dtype_converts_and_reports(llama_dir, tiny_text_file, tmp_path):
    out, report = tmp_path / "p", tmp_path / "r.json"
    result = CliRunner().invoke(cli, ["prune", str(llama_dir), "--method", "wanda", "--sparsity", "0.5", "--calib",
                                      str(tiny_text_file), "--nsamples", "4", "--seqlen", "32", "--dtype", "bf16",
                                      "--out", str(out), "--json", str(report)])
    assert result.exit_code == 0, result.output
    dtypes, size = stored(out)
    assert dtypes == {"BF16"} and size == stored(llama_dir)[1] // 2
    assert json.loads(report.read_text())["dtype"] == "bfloat16" and "bfloat16" in result.stdout


@pytest.fixture(scope="module")
def pruned_bf16(tmp_path_factory) -> dict[str, Path]:
    """Magnitude-pruned bf16 tiny models of two families (GPT-2's Conv1D stores weights transposed)."""
    root = tmp_path_factory.mktemp("pruned-bf16")
    folders = {}
    for family in ("llama", "gpt2"):
        src = save_as(save_tiny_model(root / f"{family}-fp32", family), root / f"{family}-bf16", torch.bfloat16)
        folders[family] = root / f"{family}-50"
        prune_checkpoint(src, "magnitude", HALF, out=folders[family], progress=False)
    return folders


def nnz(folder: Path) -> dict[str, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return {name: int(torch.count_nonzero(linear_weight(m))) for name, m in target_linears(model).items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["seft", "masked-lora", "static"])
def test_repair_keeps_bf16_and_size(pruned_bf16, tiny_text_file, tmp_path, family, method):
    src = pruned_bf16[family]
    config = RepairConfig(method=method, data=str(tiny_text_file), steps=3, batch_size=2, seqlen=32, lr=1e-2,
                          lora_rank_equivalent=2, update_interval=2, accumulation_steps=1, device="cpu")
    assert config.dtype == "auto"
    report = repair_checkpoint(src, config, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert stored(out) == stored(src)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert verify_model(out, HALF).passed
    assert nnz(out) == nnz(src) and report.sparsity_after == pytest.approx(0.5)
    assert any(not torch.equal(a, b) for a, b in zip(_tensors(out), _tensors(src), strict=True))  # it trained


def _tensors(folder: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for path in checkpoint_files(folder):
        state.update(load_file(path))
    return [state[name] for name in sorted(state)]
