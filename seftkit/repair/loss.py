"""The causal LM training loss, with the vocabulary projection done in chunks of tokens.

HF's ``model(**batch).loss`` materialises the logits ``[B, T, V]``, upcasts them to fp32 and keeps the
log-softmax of all of them for backward: several ``B*T*V`` fp32 tensors at once, which for a small model
outweighs everything else a repair step holds. Here the model's own forward runs (its hooks included) with the
head swapped for a pass-through, so it returns the final hidden states; the head and the cross-entropy then run
``LOGIT_CHUNK_BYTES`` of fp32 logits at a time, each chunk under activation checkpointing, so only one chunk's
logits ever exist (the backward recomputes a chunk's head matmul: one extra head forward). The result is HF's
loss (labels shifted by one, ``-100`` skipped, mean over the counted tokens) to float tolerance.

Only families whose head is a plain linear on the backbone output are chunked (:data:`PLAIN_HEAD_TYPES`, and
no configured logit softcapping or scaling); anything else, and any model wrapped for DDP or FSDP (whose
hooks manage the head's weights around the outer forward), takes HF's own path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from seftkit.repair.batches import IGNORE_INDEX

LOGIT_CHUNK_BYTES = 64 * 2**20
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt2", "opt", "phi3", "olmo2"})
"""``model_type`` s whose CausalLM forward, without labels, returns ``lm_head(final hidden states)`` as the logits,
and whose loss is HF's shifted cross-entropy."""
SPECIAL_HEAD_SETTINGS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config fields that change the logits after the head (a set one sends the model down HF's path)."""


def chunkable(model: nn.Module) -> bool:
    """Whether :func:`causal_lm_loss` can chunk ``model``'s head (see the module docstring)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or _is_fsdp(model):
        return False
    config = model.config
    if config.model_type not in PLAIN_HEAD_TYPES:
        return False
    if any(getattr(config, name, None) not in (None, 1.0) for name in SPECIAL_HEAD_SETTINGS):
        return False
    return isinstance(model.get_output_embeddings(), nn.Module)


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose label is not -100, as HF computes it."""
    if not chunkable(model):
        return model(**batch, use_cache=False).loss
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with _head_passed_through(model) as head:
        hidden = model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:].reshape(-1)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    rows = max(1, LOGIT_CHUNK_BYTES // (4 * head.weight.shape[0]))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), rows):
        total = total + checkpoint(_chunk_loss_sum, head, hidden[start:start + rows], labels[start:start + rows],
                                   use_reentrant=False)
    return total / (labels != IGNORE_INDEX).sum()


class _PassThrough(nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextmanager
def _head_passed_through(model: nn.Module) -> Iterator[nn.Module]:
    """The model's head (yielded) swapped for a pass-through for the block, put back also on an error."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(_PassThrough())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
