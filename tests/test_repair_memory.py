"""Repair memory: SEFT's active mask stored as bits, and the causal LM loss with the head chunked."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_tiny_model, make_tokenizer
from torch import nn

from seftkit.repair import loss as loss_module
from seftkit.repair.delta import SparseDeltaLinear, pack_bits, unpack_bits
from seftkit.repair.loss import causal_lm_loss, chunkable

EXTRA_FAMILIES = {  # chunked families beyond conftest's, with tiny widths
    "gemma3_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=16),
    "qwen3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
    "olmo2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
}


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1001])
def test_bits_round_trip_in_an_eighth_of_the_bytes(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 8)
    assert torch.equal(unpack_bits(packed, (numel,)), mask)
    assert int(packed[0]) == sum(1 << i for i in range(min(8, numel)) if mask[i])  # bit i is position i


def test_delta_linear_stores_its_active_mask_as_bits():
    base = nn.Linear(13, 5)  # 65 weights: not a multiple of 8
    with torch.no_grad():
        base.weight[:, ::3] = 0
    layer = SparseDeltaLinear(base, torch.tensor([1, 2, 4]))
    assert [name for name, _ in layer.named_buffers()] == ["indices", "active_bits"]
    assert layer.active_bits.numel() == 9
    assert torch.equal(layer.active, base.weight != 0)
    other = torch.rand(5, 13, generator=torch.Generator().manual_seed(1)) < 0.5
    layer.set_active(other.view(-1))
    assert torch.equal(layer.active, other)
    layer.active.fill_(False)  # a copy: the stored mask is unchanged
    assert torch.equal(layer.active, other)


def _tiny(family: str, **config_overrides) -> nn.Module:
    if family in FAMILIES:
        model, _ = make_tiny_model(family)
        return model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=len(make_tokenizer()), bos_token_id=0, eos_token_id=0,
                                  pad_token_id=0, **EXTRA_FAMILIES[family], **config_overrides)
    return AutoModelForCausalLM.from_config(config).eval()


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, vocab, (2, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # a padded row, as task batches have
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :4] = -100  # a prompt without loss
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _loss_and_grads(model: nn.Module, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks for both ways (GPT-2 and OPT train with dropout)
    loss = compute()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", [*FAMILIES, *EXTRA_FAMILIES])
def test_chunked_loss_matches_hf_loss_and_gradients(family, monkeypatch):
    model = _tiny(family)
    model.train()
    batch = _batch(model.config.vocab_size)
    rows_per_chunk = 3
    monkeypatch.setattr(loss_module, "LOGIT_CHUNK_BYTES", rows_per_chunk * 4 * model.config.vocab_size)
    head, head_rows, model_calls = model.get_output_embeddings(), [], []
    head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[0]))
    model.register_forward_pre_hook(lambda m, args, kwargs: model_calls.append(kwargs["input_ids"]),
                                    with_kwargs=True)  # as lora-prune records its calibration rows
    assert chunkable(model)
    reference, reference_grads = _loss_and_grads(model, lambda: model(**batch, use_cache=False).loss)
    head_rows.clear()
    loss, grads = _loss_and_grads(model, lambda: causal_lm_loss(model, batch))
    # 2 x 10 shifted positions in chunks of 3; backward runs each chunk's head again, last chunk first
    assert head_rows == [3] * 6 + [2] + [2] + [3] * 6
    assert len(model_calls) == 2 and model.get_output_embeddings() is head
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_special_heads_and_wrapped_models_take_hf_path():
    softcapped = _tiny("gemma3_text", final_logit_softcapping=3.0)
    assert not chunkable(softcapped)
    batch = _batch(softcapped.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(causal_lm_loss(softcapped, batch), softcapped(**batch, use_cache=False).loss)

    class Wrapper(nn.Module):  # as DDP wraps the model: its forward must run
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return self.inner(**kwargs)

    model, _ = make_tiny_model("llama")
    assert chunkable(model) and not chunkable(Wrapper(model))
    with torch.no_grad():
        assert torch.equal(causal_lm_loss(Wrapper(model), batch), model(**batch, use_cache=False).loss)
