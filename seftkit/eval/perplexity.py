"""Perplexity under the Wanda/SparseGPT protocol, so numbers line up with the pruning literature.

The texts are joined with blank lines and tokenized once, cut into non-overlapping windows of ``seqlen``
tokens (the tail that does not fill a window is dropped), and each window is scored on its own: every token
but the first is predicted. Perplexity is exp of the mean NLL over all predicted tokens. The result carries
seqlen, window and token counts because perplexities at different seqlens are not comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from seftkit.data import token_windows
from seftkit.errors import SeftkitError
from seftkit.models import cap_seqlen

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class PerplexityResult:
    """``nll`` is the mean negative log-likelihood (nats) per predicted token; ``tokens`` counts those
    predicted tokens, ``windows * (seqlen - 1)``."""

    ppl: float
    nll: float
    windows: int
    tokens: int
    seqlen: int


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    seqlen: int = 512,
    batch_size: int = 4,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Token-level perplexity of ``model`` on ``texts``; ``seqlen`` is capped at the model's max positions."""
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise SeftkitError(f"batch size must be at least 1, got {batch_size}")
    seqlen = cap_seqlen(model, seqlen)
    windows = token_windows(tokenizer, texts, seqlen, nsamples=max_windows, random=False)
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    with torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total += nll.double().cpu()
    tokens = len(windows) * (seqlen - 1)
    mean_nll = total.item() / tokens
    ppl = math.exp(mean_nll) if mean_nll < 700 else math.inf  # a broken model must not crash the report
    return PerplexityResult(ppl, mean_nll, len(windows), tokens, seqlen)
