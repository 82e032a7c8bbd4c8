"""Shared fixtures: tiny random models of several families and a tiny offline tokenizer.

Nothing here downloads: configs are built in code, the tokenizer is trained in memory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt")
_TEXT = (
    "The quick brown fox jumps over the lazy dog. Sparse models keep most weights at zero. "
    "Pruning removes weights; repair fine-tunes what is left. A lamp, a river, a city at night. "
) * 20


def tiny_config(family: str, vocab_size: int = 256):
    """A few-layer config whose widths are multiples of 4 and 8 (N:M friendly)."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family in ("llama", "mistral", "qwen2"):
        kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    elif family == "gpt2":
        kw = dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)
    elif family == "opt":
        kw = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, word_embed_proj_dim=32)
    else:
        raise ValueError(family)
    return AutoConfig.for_model(family, **common, **kw)


def make_tokenizer(vocab_size: int = 256):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_tiny_model(family: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=len(tokenizer)))
    model.eval()
    return model, tokenizer


def save_tiny_model(path: Path, family: str = "llama", seed: int = 0) -> Path:
    model, tokenizer = make_tiny_model(family, seed)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join([_TEXT] * 5))
    return path


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(request, tmp_path_factory) -> Path:
    """A saved tiny model folder per family (read-only: copy it before changing it)."""
    return save_tiny_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")
