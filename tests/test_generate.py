"""seftkit generate: greedy tokens on the sparse kernels equal dense transformers' on the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_model, make_tokenizer

import seftkit
from seftkit.cli.main import cli
from seftkit.errors import SeftkitError
from seftkit.generation import GenerateConfig, generate, prompt_ids
from seftkit.kernels import SparseLinear
from seftkit.models import linear_weight, save_model, target_linears
from seftkit.sparsity.masks import unstructured_mask

PROMPT = "The quick brown fox"


def tiny_gemma3():
    """Gemma-3 with a sliding window shorter than the generated text (the conftest families have none)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer()
    config = AutoConfig.for_model("gemma3_text", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=256, sliding_window=4, bos_token_id=0, eos_token_id=0,
                                  pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def pruned_tiny(family: str, sparsity: float = 0.7):
    model, tokenizer = tiny_gemma3() if family == "gemma3" else make_tiny_model(family)
    with torch.no_grad():
        for module in target_linears(model).values():
            weight = linear_weight(module)
            weight.masked_fill_(~unstructured_mask(weight.abs(), sparsity), 0)
    return model, tokenizer


def dense_greedy(model, tokenizer, tokens: int) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma3", "gpt2", "opt"])
def test_sparse_greedy_tokens_equal_dense_transformers(family):
    model, tokenizer = pruned_tiny(family)
    expected = dense_greedy(model, tokenizer, 12)
    report = generate(model, PROMPT, max_new_tokens=12, tokenizer=tokenizer, backend="sparse", threads=1)
    assert report.tokens == expected and report.new_tokens == len(expected) > 1
    assert report.sparse_layers == report.target_layers == len(target_linears(model))
    assert report.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert report.prompt_tokens == len(tokenizer(PROMPT).input_ids) and not report.chat_template
    assert report.prefill_tokens_per_s > 0 and report.decode_tokens_per_s > 0 and report.threads == 1
    # the caller's model is not swapped in place
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


def test_dense_backend_runs_plain_transformers():
    model, tokenizer = pruned_tiny("llama")
    report = generate(model, PROMPT, max_new_tokens=6, tokenizer=tokenizer, backend="dense")
    assert report.sparse_layers == 0 and report.tokens == dense_greedy(model, tokenizer, 6)


def test_sparse_backend_refuses_a_dense_model():
    model, tokenizer = make_tiny_model("opt")
    with pytest.raises(SeftkitError, match="no targeted linear runs on the sparse kernels"):
        generate(model, PROMPT, max_new_tokens=2, tokenizer=tokenizer, backend="sparse")
    assert generate(model, PROMPT, max_new_tokens=2, tokenizer=tokenizer).sparse_layers == 0  # auto stays dense


def test_chat_template_is_applied_when_present():
    _, tokenizer = make_tiny_model("llama")
    tokenizer.chat_template = "{% for m in messages %}<eos>{{ m['content'] }}<eos>{% endfor %}"
    templated, used = prompt_ids(tokenizer, PROMPT, chat_template=True)
    raw, unused = prompt_ids(tokenizer, PROMPT, chat_template=False)
    assert used and not unused
    assert templated[0].tolist() == [0, *raw[0].tolist(), 0]  # <eos> is id 0 in the tiny tokenizer


def test_sampling_is_seeded():
    model, tokenizer = pruned_tiny("qwen2")
    runs = [generate(model, PROMPT, max_new_tokens=8, tokenizer=tokenizer, sample=True, temperature=1.5,
                     top_p=0.9, seed=seed).tokens for seed in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_generate_leaves_the_callers_random_state_alone():
    model, tokenizer = pruned_tiny("qwen2")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    generate(model, PROMPT, max_new_tokens=4, tokenizer=tokenizer, sample=True, seed=7)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(("options", "message"), [
    ({"backend": "nm"}, "unknown backend 'nm'"),
    ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1"),
    ({"temperature": 0.5}, "--temperature and --top-p apply with --sample only"),
    ({"sample": True, "top_p": 1.5}, "--top-p must be in (0, 1]"),
    ({"dtype": "int3"}, "unknown dtype 'int3'"),
])
def test_config_refuses_bad_options(options, message):
    with pytest.raises(SeftkitError, match=message.replace("(", r"\(").replace("]", r"\]")):
        GenerateConfig(**options)


def test_cli_prints_text_and_speeds(tmp_path):
    model, tokenizer = pruned_tiny("mistral")
    save_model(model, tokenizer, tmp_path / "m")
    result = CliRunner().invoke(cli, ["generate", str(tmp_path / "m"), "--prompt", PROMPT, "--max-new-tokens", "5",
                                      "--threads", "1", "--json", str(tmp_path / "g.json")])
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "g.json").read_text())
    assert result.stdout == report["text"] + "\n"
    assert report["tokens"] == dense_greedy(model, tokenizer, 5) and report["sparse_layers"] == 14
    assert "prefill" in result.stderr and f"{report['decode_tokens_per_s']:.1f} tok/s" in result.stderr
    # the two-line Python API gives the same tokens
    assert seftkit.generate(tmp_path / "m", PROMPT, max_new_tokens=5).tokens == report["tokens"]


def test_cli_bad_option_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["generate", "smollm2-135m", "--prompt", "x", "--top-p", "0.5"])
    assert result.exit_code == 2
    assert result.stderr == "seftkit: error: --temperature and --top-p apply with --sample only (the default is " \
                            "greedy)\n"
