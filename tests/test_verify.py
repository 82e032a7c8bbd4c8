"""seftkit verify: counts against torch, N:M locations, dtypes, sharding, bad input and the torch-free CLI."""

from __future__ import annotations

import functools
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import seftkit
from seftkit.cli.main import cli
from seftkit.errors import SeftkitError
from seftkit.models import linear_weight, load_model, save_model, target_linears
from seftkit.sparsity import scanner
from seftkit.sparsity.masks import nm_mask, unstructured_mask
from seftkit.sparsity.pattern import SparsityPattern
from seftkit.sparsity.targets import TargetRule
from seftkit.verify import scan_tensor, verify_model

NM_2_4 = SparsityPattern(n=2, m=4)


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["verify", *map(str, args)])


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def edit_linears(folder: Path, edit) -> dict[str, torch.Tensor]:
    """Apply ``edit(name, weight_out_in)`` to every targeted linear, save, return the torch state dict."""
    model, tokenizer = load_model(folder, with_tokenizer=True)
    with torch.no_grad():
        for name, module in target_linears(model).items():
            edit(name, linear_weight(module))
    shutil.rmtree(folder)
    save_model(model, tokenizer, folder)
    return {k: v for k, v in model.state_dict().items()}


def safetensors_bytes(header: dict | list, data: bytes = bytes(32)) -> bytes:
    """A hand-made safetensors file, to write headers the official writer refuses to produce."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# --- counts and selection, every family -------------------------------------------------------------------


def test_counts_match_torch_and_modules(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "m")

    def zero_some(name, w):  # a different number of zeros per weight, some of them -0.0
        w[0, : 3 + len(name) % 5] = 0.0
        w[-1, -2:] = -0.0

    state = edit_linears(folder, zero_some)
    report = verify_model(folder)

    model, _ = load_model(folder, with_tokenizer=False)
    expected = {f"{n}.weight" for n in target_linears(model)}
    assert {t.name for t in report.tensors} == expected
    for t in report.tensors:
        assert t.zeros == int((state[t.name] == 0).sum()), t.name
        assert t.numel == state[t.name].numel()
    assert report.overall.zeros == sum(int((state[n] == 0).sum()) for n in expected)
    assert sum(layer.numel for layer in report.per_layer.values()) == report.overall.numel
    assert sorted(report.per_layer) == [0, 1]
    assert report.passed  # no pattern: measure only
    assert seftkit.verify_model is verify_model  # the lazy top-level export


def test_nm_agrees_with_torch_masks_and_finds_first_violation(tiny_model_dir, tmp_path):
    """2:4 masks built on [out, in] views pass on every family, GPT-2's [in, out] storage included."""
    folder = copy_model(tiny_model_dir, tmp_path / "m")
    broken = sorted(target_linears(load_model(folder, with_tokenizer=False)[0]))[0]

    def prune_then_break(name, w):
        w.mul_(nm_mask(w.abs(), 2, 4))
        if name == broken:
            w[5, 8:12] = 1.0   # group (5, 8): no zeros
            w[2, 20:23] = 1.0  # group (2, 20): one zero short; first in row-major order
            w[2, 23] = 0.0

    edit_linears(folder, prune_then_break)
    report = verify_model(folder, NM_2_4)
    assert not report.passed
    [bad] = report.failures
    assert bad.name == f"{broken}.weight"
    assert (bad.first_violation.row, bad.first_violation.column) == (2, 20)
    assert bad.nm_violations == 2
    assert all(t.nm_ok for t in report.tensors if t is not bad)


def test_nm_first_violation_across_row_blocks(tmp_path, monkeypatch):
    """With tiny row blocks the first violation is still the smallest (row, column), stored either way."""
    zero = np.zeros((16, 24), dtype=np.float32)  # [out, in], all zero
    zero[9, 4:8] = 1.0
    zero[3, 16:20] = 1.0
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.from_numpy(zero), "b": torch.from_numpy(zero.T.copy())}, str(path))
    monkeypatch.setattr("seftkit.verify.row_blocks", functools.partial(scanner.row_blocks, budget=40))
    infos = {i.name: i for i in scanner.read_header(path)}
    files = scanner.MappedFiles()
    for name, transposed in (("a", False), ("b", True)):
        stats = scan_tensor(infos[name], files, NM_2_4, transposed=transposed)
        assert (stats.nm_first_violation, stats.nm_violations, stats.zeros) == ((3, 16), 2, 16 * 24 - 8)


def test_sparsity_threshold_with_tolerance(llama_dir, tmp_path):
    folder = copy_model(llama_dir, tmp_path / "m")
    target = "model.layers.1.mlp.up_proj"  # [64, 32]: 2048 weights, 1024 zeros at 50%

    def half(name, w):
        keep = unstructured_mask(w.abs(), 0.5)
        if name == target:  # 1021 zeros: 49.85%, under 50% - 0.001 (1022 would pass)
            keep.view(-1)[torch.nonzero(~keep.view(-1)).flatten()[:3]] = True
        w.mul_(keep)

    edit_linears(folder, half)
    assert verify_model(folder, SparsityPattern(sparsity=0.5), tol=0.002).passed
    report = verify_model(folder, SparsityPattern(sparsity=0.5), tol=0.001)
    [bad] = report.failures
    assert (bad.name, bad.zeros) == (f"{target}.weight", 1021)
    assert bad.shortfall == pytest.approx(0.499 - 1021 / 2048)

    result = run_cli(folder, "--sparsity", "0.5", "--json", tmp_path / "r.json")
    assert result.exit_code == 1
    assert f"{target}.weight" in result.stdout and "FAIL: 1 of 14" in result.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is False
    assert data["thresholds"] == {"sparsity": 0.5, "tol": 0.001, "nm": None, "include": None, "exclude": None}
    assert data["global"]["zeros"] == report.overall.zeros
    assert [t["name"] for t in data["tensors"] if not t["passed"]] == [f"{target}.weight"]

    ok = run_cli(folder, "--sparsity", "0.5", "--tol", "0.01", "--per-layer")
    assert ok.exit_code == 0, ok.output
    assert "PASS: all 14 weights" in ok.stdout and "layer" in ok.stdout


def test_include_exclude(llama_dir):
    mlp = verify_model(llama_dir, rule=TargetRule(include=r"mlp\.(up|down)_proj"))
    assert {t.name for t in mlp.tensors} == {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1)
                                           for p in ("up", "down")}
    no_q = verify_model(llama_dir, rule=TargetRule(exclude="q_proj"))
    assert len(no_q.tensors) == 12 and not any("q_proj" in t.name for t in no_q.tensors)


# --- dtypes, files and shards -----------------------------------------------------------------------------

DTYPE_CASES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
               torch.float8_e5m2, torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", DTYPE_CASES, ids=str)
def test_zero_bits_per_dtype(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(-3, 4, (8, 16), generator=gen).float()
    values[0, :4] = -0.0
    values[1, :8] = torch.tensor([float("nan"), float("inf"), 1e-3, -1e-3, 0.0, 2.0, -0.0, 0.5])
    weight = values.to(dtype)
    path = save_file_model(tmp_path, {"model.layers.0.mlp.up_proj.weight": weight})
    [t] = verify_model(path).tensors
    assert t.zeros == int((weight.float() == 0).sum())
    assert t.zeros > 8  # the -0.0 entries and the random zeros were all counted


def save_file_model(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = folder / "model.safetensors"
    save_file(tensors, str(path))
    return path


def test_sharded_checkpoint_matches_single_file(llama_dir, tmp_path):
    model, tokenizer = load_model(llama_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / scanner.INDEX_FILE).is_file()
    single, sharded = verify_model(llama_dir), verify_model(tmp_path / "sharded")
    assert len(sharded.files) == len(shards)
    assert sorted((t.name, t.zeros) for t in sharded.tensors) == sorted((t.name, t.zeros) for t in single.tensors)

    shards[-1].unlink()
    result = run_cli(tmp_path / "sharded")
    assert result.exit_code == 2 and f"shard {shards[-1].name} listed in" in result.stderr


def test_tensor_in_two_shards_is_corrupt(tmp_path):
    weight = torch.zeros(4, 4)
    save_file({"model.layers.0.a.weight": weight}, str(tmp_path / "a.safetensors"))
    save_file({"model.layers.0.a.weight": weight}, str(tmp_path / "b.safetensors"))
    (tmp_path / scanner.INDEX_FILE).write_text(json.dumps(
        {"weight_map": {"model.layers.0.a.weight": "a.safetensors", "x": "b.safetensors"}}))
    with pytest.raises(SeftkitError, match="also stored in a.safetensors"):
        verify_model(tmp_path)


# --- bad input: exit 2, one line ----------------------------------------------------------------------------

W = "model.layers.0.mlp.up_proj.weight"
F32_2x4 = {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}
CORRUPT = {  # label: (file bytes, what the message must say)
    "truncated": (safetensors_bytes({W: F32_2x4})[:-10], "data section has 22"),
    "too short": (b"\x01\x02", "too short for a header"),
    "huge header": (struct.pack("<Q", 1 << 40) + b"{}", "exceeds the file size"),
    "not json": (struct.pack("<Q", 3) + b"{x}", "header is not valid JSON"),
    "not an object": (safetensors_bytes([]), "header is not a JSON object"),
    "size mismatch": (safetensors_bytes({W: {**F32_2x4, "shape": [3, 4]}}), "needs 48"),
    "bad shape": (safetensors_bytes({W: {**F32_2x4, "shape": [-2, -4]}}), "invalid shape"),
    "bad offsets": (safetensors_bytes({W: {**F32_2x4, "data_offsets": [0]}}), "invalid data_offsets"),
    "overlap": (safetensors_bytes({W: F32_2x4, "x": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}),
                "overlap"),
}


@pytest.mark.parametrize("label", CORRUPT)
def test_corrupt_safetensors_exit_2(label, tmp_path):
    data, why = CORRUPT[label]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    for target in (path, tmp_path):  # the file itself, and the folder holding it
        result = run_cli(target)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"seftkit: error: corrupt or truncated safetensors {path}: "), result.stderr
        assert why in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert result.stdout == ""


@pytest.mark.parametrize(("args", "message"), [
    (["{missing}"], "does not exist"),
    (["{empty}"], "is not a model folder"),
    (["{readme}"], "is not a model folder or a .safetensors file"),
    (["{llama}", "--nm", "2-4"], "bad N:M pattern '2-4'"),
    (["{llama}", "--nm", "4:2"], "need 0 < N < M"),
    (["{llama}", "--nm", "2:5"], "is not a multiple of 5"),
    (["{llama}", "--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["{llama}", "--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    (["{llama}", "--sparsity", "0.5", "--nm", "2:4"], "either --sparsity or --nm"),
    (["{llama}", "--sparsity", "0.5", "--tol", "-1"], "tolerance must be in [0, 1)"),
    (["{llama}", "--include", "("], "bad --include regular expression"),
    (["{llama}", "--include", "nothing_matches"], "no weights in"),
])
def test_bad_input_exit_2(args, message, llama_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "README.md").write_text("hi")
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "readme": tmp_path / "README.md",
             "llama": llama_dir}
    result = run_cli(*[a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("seftkit: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert result.stdout == ""


def test_pickle_only_folder_is_not_a_model(llama_dir, tmp_path):
    folder = copy_model(llama_dir, tmp_path / "m")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    result = run_cli(folder)
    assert result.exit_code == 2 and "no *.safetensors weights" in result.stderr


# --- torch-free, and the real model ---------------------------------------------------------------------------


def test_cli_never_imports_torch(llama_dir, tmp_path):
    code = (
        "import sys\n"
        "from seftkit.cli.main import cli\n"
        f"try:\n    cli(['verify', {str(llama_dir)!r}, '--nm', '2:4', '--json', {str(tmp_path / 'r.json')!r}])\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
        "print('exit', code, 'heavy', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "exit 1 heavy []"  # a dense model fails 2:4, without torch
    assert json.loads((tmp_path / "r.json").read_text())["thresholds"]["nm"] == "2:4"


def test_cli_runs_on_the_light_install(llama_dir):
    """click + numpy only: torch, transformers, safetensors and tqdm cannot be imported."""
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'safetensors', 'tqdm'):\n    sys.modules[name] = None\n"
        "from seftkit.cli.main import cli\n"
        f"cli(['verify', {str(llama_dir)!r}, '--sparsity', '0.5'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr  # a dense model is below 50%: exit 1, not an ImportError
    assert "FAIL" in result.stdout or "below" in result.stdout


@pytest.mark.slow
def test_default_model():
    report = verify_model("smollm2-135m")
    assert report.model_type == "llama" and len(report.tensors) == 30 * 7
    assert report.overall.numel == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert report.passed and sorted(report.per_layer) == list(range(30))
