"""seftkit prune: exact sparsity, fidelity to plain references, the shared calibration loop, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import FAMILIES, make_tiny_model, save_tiny_model

from seftkit.cli.main import cli
from seftkit.data import load_texts
from seftkit.errors import SeftkitError
from seftkit.models import find_decoder_layers, linear_weight, target_linears
from seftkit.prune import PRUNERS, prune_model
from seftkit.prune.calibrate import capture_block_inputs, run_block
from seftkit.prune.sparsegpt import input_gram, sparsegpt_prune
from seftkit.prune.wanda import input_sq_norms, wanda_mask
from seftkit.sparsity.masks import nm_valid
from seftkit.sparsity.pattern import SparsityPattern
from seftkit.sparsity.targets import TargetRule

NSAMPLES, SEQLEN = 4, 32
HALF = SparsityPattern(sparsity=0.5)
TWO_FOUR = SparsityPattern(n=2, m=4)


@pytest.fixture(scope="module")
def texts(tiny_text_file) -> list[str]:
    return load_texts(str(tiny_text_file))


def pruned_tiny(family: str, method: str, pattern: SparsityPattern, texts: list[str], **kw):
    model, tokenizer = make_tiny_model(family)
    report = prune_model(model, tokenizer, method, pattern, texts, nsamples=NSAMPLES, seqlen=SEQLEN,
                         progress=False, **kw)
    return model, report


def weights(model) -> dict[str, torch.Tensor]:
    return {name: linear_weight(m).detach().clone() for name, m in target_linears(model).items()}


# --- exactness -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_nm_is_exact_in_every_group(family, method, texts):
    model, report = pruned_tiny(family, method, TWO_FOUR, texts)
    targets = weights(model)
    assert len(report.tensors) == len(targets) > 0
    for name, w in targets.items():
        zeros = (w == 0).reshape(w.shape[0], -1, 4).sum(dim=2)
        assert (zeros == 2).all(), name
        assert nm_valid(w, 2, 4)
        assert report.tensors[f"{name}.weight"]["nm_ok"] is True
    assert report.overall_sparsity == 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_magnitude_drops_the_smallest_of_each_matrix(family, texts):
    dense = weights(make_tiny_model(family)[0])
    model, report = pruned_tiny(family, "magnitude", SparsityPattern(sparsity=0.7), texts)
    assert report.calibration is None
    for name, w in weights(model).items():
        pruned = w == 0
        assert int(pruned.sum()) == int(w.numel() * 0.7), name
        assert dense[name][pruned].abs().max() <= dense[name][~pruned].abs().min()
        assert torch.equal(w[~pruned], dense[name][~pruned])  # kept weights untouched


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_wanda_is_exact_per_row(family, sparsity, texts):
    model, report = pruned_tiny(family, "wanda", SparsityPattern(sparsity=sparsity), texts)
    assert report.calibration == {"nsamples": NSAMPLES, "seqlen": SEQLEN, "seed": 0}
    for name, w in weights(model).items():
        per_row = (w == 0).sum(dim=1)
        assert (per_row == math.ceil(w.shape[1] * sparsity)).all(), name  # 0.7 * 32 = 22.4 -> 23: at least 70%


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsegpt_is_exact_per_matrix_and_updates_kept_weights(family, texts):
    dense = weights(make_tiny_model(family)[0])
    model, _ = pruned_tiny(family, "sparsegpt", HALF, texts)
    for name, w in weights(model).items():
        assert w.shape[1] <= 128  # one block: the count is exact for the whole matrix
        pruned = w == 0
        assert int(pruned.sum()) == w.numel() // 2, name
        assert not torch.equal(w[~pruned], dense[name][~pruned])  # OBS moved the survivors


def test_sparsegpt_is_exact_per_128_column_block():
    torch.manual_seed(0)
    w = torch.randn(12, 300)
    x = torch.randn(400, 300)
    sparsegpt_prune(w, input_gram(x) / 400, SparsityPattern(sparsity=0.6))
    for start, width in [(0, 128), (128, 128), (256, 44)]:
        assert int((w[:, start : start + width] == 0).sum()) == int(12 * width * 0.6)


def test_sparsegpt_nm_groups_never_straddle_blocks():
    torch.manual_seed(0)
    w = torch.randn(8, 140)  # 5:7 -> blocks of 126 columns, 20 groups of 7
    sparsegpt_prune(w, input_gram(torch.randn(200, 140)) / 200, SparsityPattern(n=5, m=7))
    assert ((w == 0).reshape(8, 20, 7).sum(dim=2) == 5).all()


def test_sparsity_zero_changes_nothing():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    x = torch.randn(256, 64)
    before = w.clone()
    keep = sparsegpt_prune(w, input_gram(x) / 256, SparsityPattern(sparsity=0.0))
    assert keep.all()
    assert torch.equal(w, before)


# --- fidelity ------------------------------------------------------------------------------------------------


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def llama_linear_inputs(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs ``[tokens, in]`` of every linear of a dense Llama block, computed by hand from its input ``h``."""
    attn, mlp = layer.self_attn, layer.mlp
    b, s, _ = h.shape
    hd = attn.head_dim
    x = layer.input_layernorm(h)
    q, k, v = (proj(x).view(b, s, -1, hd).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    a = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, s, -1)
    y = layer.post_attention_layernorm(h + attn.o_proj(a))
    down = mlp.act_fn(mlp.gate_proj(y)) * mlp.up_proj(y)
    flat = {"self_attn.q_proj": x, "self_attn.k_proj": x, "self_attn.v_proj": x, "self_attn.o_proj": a,
            "mlp.gate_proj": y, "mlp.up_proj": y, "mlp.down_proj": down}
    return {name: t.reshape(-1, t.shape[-1]) for name, t in flat.items()}


@torch.no_grad()
def reference_wanda(model, windows: torch.Tensor, sparsity: float) -> None:
    """Wanda as the paper states it, with no hooks: block by block, inputs from a full forward of the
    partially pruned model, score |W| * ||X_j||, drop the lowest per row."""
    positions = torch.arange(windows.shape[1]).unsqueeze(0)
    for i, layer in enumerate(model.model.layers):
        h = model(windows, output_hidden_states=True).hidden_states[i]
        cos, sin = model.model.rotary_emb(h, positions)
        for name, x in llama_linear_inputs(layer, h, cos, sin).items():
            w = layer.get_submodule(name).weight
            score = w.abs() * x.norm(dim=0)
            drop = torch.sort(score, dim=1, stable=True).indices[:, : int(w.shape[1] * sparsity)]
            w.scatter_(1, drop, 0.0)


def test_wanda_matches_hook_free_reference(texts):
    from seftkit.prune import calibration_windows

    model, tokenizer = make_tiny_model("llama")
    windows = calibration_windows(model, tokenizer, texts, nsamples=5, seqlen=SEQLEN, seed=3)
    reference, _ = make_tiny_model("llama")
    reference_wanda(reference, windows, 0.5)
    report = prune_model(model, tokenizer, "wanda", HALF, windows, batch_size=2, progress=False)  # batches 2, 2, 1
    assert report.calibration == {"nsamples": 5, "seqlen": SEQLEN, "seed": None}
    ours, theirs = weights(model), weights(reference)
    assert len(ours) == 14
    for name in ours:
        assert torch.equal(ours[name] == 0, theirs[name] == 0), name


@pytest.mark.parametrize("pattern", [HALF, TWO_FOUR, SparsityPattern(sparsity=0.75)])
def test_sparsegpt_reconstructs_better_than_wanda(pattern):
    torch.manual_seed(0)
    # Correlated inputs with uneven feature scales, as in real activations.
    x = (torch.randn(1024, 48) @ torch.randn(48, 64)) * torch.logspace(-1, 1, 64)
    w = torch.randn(32, 64)
    wanda = w * wanda_mask(w, input_sq_norms(x) / 1024, pattern)
    sparsegpt = w.clone()
    sparsegpt_prune(sparsegpt, input_gram(x) / 1024, pattern)

    def error(pruned: torch.Tensor) -> float:
        return float(torch.linalg.norm((w - pruned) @ x.T))

    assert (sparsegpt == 0).sum() == (wanda == 0).sum()
    assert error(sparsegpt) < error(wanda)


def test_sparsegpt_update_is_the_least_squares_optimum():
    """With one weight per row clearly the cheapest to drop (column 0), OBS must compensate exactly as least
    squares does: w'_rest = w_rest + w_0 H_rest,rest^-1 H_rest,0, with the dampened H."""
    torch.manual_seed(0)
    x = torch.randn(512, 16) @ torch.randn(16, 16)
    w = torch.randn(4, 16)
    w[:, 1:] = w[:, 1:].sign() * (10 + w[:, 1:].abs())
    gram = input_gram(x) / 512
    pruned = w.clone()
    sparsegpt_prune(pruned, gram, SparsityPattern(sparsity=1 / 16))
    h = 2 * gram.double()
    h += 0.01 * h.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    rest = slice(1, None)
    update = w.double()[:, :1] * torch.linalg.solve(h[rest, rest], h[rest, 0]).unsqueeze(0)
    assert (pruned[:, 0] == 0).all()
    torch.testing.assert_close((pruned - w)[:, rest].double(), update, rtol=1e-4, atol=1e-4)


def make_other_family(family: str):
    """Families beyond conftest's: GPT-NeoX, and Gemma 3 whose layers alternate sliding-window (8 tokens, shorter
    than the windows) and global attention with different rotary bases, so each block gets its own mask and
    position embeddings."""
    from conftest import make_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    extra = {"gemma3_text": dict(head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2)}
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                  hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256, **extra.get(family, {}))
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_neox", "gemma3_text"])
def test_block_loop_reproduces_the_dense_forward(family, texts):
    """Captured block inputs, run block by block in batches of 2 (sizes 2, 2, 1), equal the model's own."""
    from seftkit.prune import calibration_windows

    model, tokenizer = make_tiny_model(family) if family in FAMILIES else make_other_family(family)
    windows = calibration_windows(model, tokenizer, texts, nsamples=5, seqlen=SEQLEN, seed=0)
    with torch.no_grad():
        expected = model(windows, output_hidden_states=True).hidden_states
    _, layers = find_decoder_layers(model)
    inputs = capture_block_inputs(model, layers, windows, batch_size=2)
    assert sorted(inputs.extras) == [1, 2]
    assert [len(per_block) for per_block in inputs.extras.values()] == [len(layers)] * 2
    for i, block in enumerate(layers):
        torch.testing.assert_close(inputs.hidden, expected[i], rtol=1e-5, atol=1e-5)
        run_block(block, i, inputs)


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3_text"])
def test_other_families_prune_exactly(family, texts):
    model, tokenizer = make_other_family(family)
    report = prune_model(model, tokenizer, "sparsegpt", TWO_FOUR, texts, nsamples=NSAMPLES, seqlen=SEQLEN,
                         progress=False)
    assert len(report.tensors) == 4 * (7 if family == "gemma3_text" else 4)
    assert all(nm_valid(w, 2, 4) for w in weights(model).values())


# --- API validation ------------------------------------------------------------------------------------------


def test_seqlen_is_capped_to_max_positions(texts):
    model, tokenizer = make_tiny_model("gpt2")  # n_positions = 256
    report = prune_model(model, tokenizer, "wanda", HALF, texts * 4, nsamples=1, seqlen=4096, progress=False)
    assert report.calibration["seqlen"] == 256


def test_bad_input_leaves_the_model_untouched(texts):
    model, tokenizer = make_tiny_model("llama")
    before = weights(model)
    with pytest.raises(SeftkitError, match="input width 32 is not a multiple of 5"):
        prune_model(model, tokenizer, "wanda", SparsityPattern(n=3, m=5), texts, nsamples=2, seqlen=SEQLEN)
    with pytest.raises(SeftkitError, match="outside the decoder blocks"):
        prune_model(model, tokenizer, "sparsegpt", HALF, texts, rule=TargetRule(include=r"lm_head|layers"))
    with pytest.raises(SeftkitError, match="no weights match"):
        prune_model(model, tokenizer, "magnitude", HALF, rule=TargetRule(include="nothing-here"))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SeftkitError, match="up_proj.weight contains NaN"):
        prune_model(model, tokenizer, "magnitude", HALF)
    after = weights(model)
    for name in before:
        assert torch.equal(before[name], after[name]) or name.endswith("up_proj")


def test_magnitude_may_target_lm_head_explicitly():
    model, tokenizer = make_tiny_model("llama")
    report = prune_model(model, tokenizer, "magnitude", HALF, rule=TargetRule(include="lm_head"))
    assert list(report.tensors) == ["lm_head.weight"]
    assert int((model.lm_head.weight == 0).sum()) == model.lm_head.weight.numel() // 2
    assert not (model.model.layers[0].mlp.up_proj.weight == 0).any()


# --- CLI -----------------------------------------------------------------------------------------------------


def test_cli_offers_every_method_without_importing_torch():
    import subprocess
    import sys

    from seftkit.cli.prune import prune

    method = next(p for p in prune.params if p.name == "method")
    assert sorted(method.type.choices) == sorted(PRUNERS)
    code = "import sys, seftkit.cli.prune; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["prune", *map(str, args)])


@pytest.mark.parametrize("method,pattern", [("sparsegpt", ["--nm", "2:4"]), ("wanda", ["--sparsity", "0.6"])])
def test_cli_writes_a_loadable_model_and_report(tiny_model_dir, tiny_text_file, tmp_path, method, pattern):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report_path = tmp_path / "pruned", tmp_path / "report.json"
    result = run_cli(tiny_model_dir, "--method", method, *pattern, "--calib", tiny_text_file, "--nsamples", 4,
                     "--seqlen", SEQLEN, "--out", out, "--json", report_path)
    assert result.exit_code == 0, result.output
    assert f"with {method}" in result.stdout
    report = json.loads(report_path.read_text())
    assert report == json.loads((out / "prune_report.json").read_text())
    assert report["calibration"] == {"nsamples": 4, "seqlen": SEQLEN, "seed": 0, "data": str(tiny_text_file)}
    assert report["method"] == method and report["peak_rss_mb"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    targets = target_linears(model)
    assert sorted(f"{n}.weight" for n in targets) == sorted(report["tensors"])
    for name, module in targets.items():
        w = linear_weight(module)
        if "--nm" in pattern:
            assert nm_valid(w, 2, 4), name
        else:
            assert ((w == 0).sum(dim=1) == -(-w.shape[1] * 3 // 5)).all(), name  # ceil: every row >= 60%
        assert report["tensors"][f"{name}.weight"]["zeros"] == int((w == 0).sum())
    verified = CliRunner().invoke(cli, ["verify", str(out), *pattern])
    assert verified.exit_code == 0, verified.output


def test_cli_overwrite(llama_dir, tmp_path):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "old.txt").write_text("x")
    result = run_cli(llama_dir, "--method", "magnitude", "--sparsity", 0.5, "--out", out)
    assert result.exit_code == 2
    assert result.stderr == f"seftkit: error: output {out} already exists; pass --overwrite to replace it\n"
    assert result.exit_code == 2 and (out / "old.txt").exists()
    result = run_cli(llama_dir, "--method", "magnitude", "--sparsity", 0.5, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "prune_report.json").is_file()


def test_cli_default_out_names_model_method_and_pattern(llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(llama_dir, "--method", "magnitude", "--nm", "2:4")
    assert result.exit_code == 0, result.output
    out = tmp_path / f"{llama_dir.name}-magnitude-2of4"
    assert json.loads((out / "prune_report.json").read_text())["nm"] == "2:4"


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("nan-llama")
    model, tokenizer = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[3, 3] = float("nan")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.0"], "sparsity must be in [0, 1), got 1.0"),
    (["--sparsity", "-0.1"], "sparsity must be in [0, 1), got -0.1"),
    (["--nm", "3:5"], "N:M 3:5 does not fit model.layers.0.self_attn.q_proj.weight: input width 32"),
    (["--nm", "2:4", "--sparsity", "0.5"], "give either --sparsity or --nm, not both"),
    (["--sparsity", "0.5", "--seqlen", "64", "--calib", "SHORT"], "fewer than seqlen 64"),
    (["--sparsity", "0.5", "--include", "("], "bad --include regular expression"),
    (["--sparsity", "0.5", "--nsamples", "0"], "nsamples must be at least 1, got 0"),
    (["--sparsity", "0.5", "--batch-size", "0"], "batch size must be at least 1, got 0"),
    (["--sparsity", "0.5", "--model-is-nan"], "weight model.layers.0.self_attn.o_proj.weight contains NaN"),
])
def test_cli_bad_input_is_one_line_exit_2_nothing_written(llama_dir, nan_model_dir, tmp_path, args, message):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    model = nan_model_dir if "--model-is-nan" in args else llama_dir
    args = [str(short) if a == "SHORT" else a for a in args if a != "--model-is-nan"]
    out = tmp_path / "out" / "pruned"
    result = run_cli(model, "--method", "wanda", "--nsamples", 2, *args, "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("seftkit: error: ") and message in lines[-1]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_save_tiny_model_round_trip_through_cli_is_deterministic(tmp_path, tiny_text_file):
    """The same seed gives the same masks and weights; another seed picks other windows."""
    src = save_tiny_model(tmp_path / "src", "qwen2")
    outs = []
    for seed, name in [(0, "a"), (0, "b"), (1, "c")]:
        result = run_cli(src, "--method", "sparsegpt", "--sparsity", 0.5, "--calib", tiny_text_file, "--nsamples",
                         2, "--seqlen", SEQLEN, "--seed", seed, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        outs.append((tmp_path / name / "model.safetensors").read_bytes())
    assert outs[0] == outs[1] != outs[2]


@pytest.mark.parametrize("count", [0, 1, 5, 11, 12])
def test_drop_lowest_per_row_equals_a_stable_sort(count):
    """The partial selection keeps exactly what a stable argsort keeps, ties included (repeated values, zeros)."""
    from seftkit.prune.wanda import drop_lowest_per_row

    scores = torch.rand(64, 12)
    scores[::3, :6] = 0.5  # rows whose threshold value repeats
    scores[1::5] = 0.0  # rows of one value
    order = torch.argsort(scores, dim=1, stable=True)
    expected = torch.ones_like(scores, dtype=torch.bool).scatter_(1, order[:, :count], False)
    assert torch.equal(drop_lowest_per_row(scores, count), expected)
