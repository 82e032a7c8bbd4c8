"""Zero-shot multiple-choice scoring by log-likelihood, as lm-evaluation-harness does it, but faster.

Tokenization follows lm-eval's ``_encode_pair``: trailing spaces move from the context to the continuation,
``context`` and ``context + continuation`` are tokenized separately and the continuation is whatever the
whole encoding has beyond the context's tokens, so the split point is exact. Texts are encoded without
special tokens; a tokenizer that adds a BOS by default gets it in front, and an empty context is
conditioned on the EOS token (lm-eval's convention) when there is no BOS.

Speed: all options of a question are packed into one row -- the token prefix they share (the question) once,
then each option's remaining tokens -- with a block attention mask and per-option position ids, so every
option sees exactly the causal context it would see alone while the shared prefix is computed once. Options
that start alike (PIQA's two solutions often share most words) also share those continuation tokens: their
log-probs are the same under every option, so they are computed once and added to each option's sum. Rows are
batched longest first with right padding, and logits are computed only where a continuation token is scored.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from seftkit.errors import SeftkitError
from seftkit.eval.tasks import MCItem
from seftkit.models import max_positions

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class TaskResult:
    """Accuracy of one task; ``stderr`` is acc's standard error, sqrt(p(1-p)/(n-1)) as lm-eval reports it.

    ``gold_loglik`` is the mean summed log-likelihood of the correct option (smoother than accuracy: it moves
    before the argmax flips); ``chance`` the accuracy of guessing, the mean of 1 / options. ``correct`` and
    ``correct_norm`` (0/1 per question, in the task's order) are kept only when asked for, for paired tests.
    """

    task: str
    acc: float
    acc_norm: float
    stderr: float
    acc_norm_stderr: float
    n: int
    gold_loglik: float = math.nan
    chance: float = math.nan
    correct: list[int] | None = None
    correct_norm: list[int] | None = None


@dataclass
class _Row:
    """One question packed as shared prefix + each option's tail, ready for a single forward pass."""

    tokens: list[int]
    segments: list[int]  # 0 = shared prefix, k + 1 = tail of option k
    positions: list[int]
    scored: list[tuple[int, int, int]]  # (row index whose logits predict it, target token, option)


def accuracy_stderr(p: float, n: int) -> float:
    """Standard error of a mean of n Bernoulli outcomes with the sample (n-1) variance; NaN when n < 2."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan


class _Encoder:
    """lm-eval's context/continuation split on one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and list(tokenizer("").input_ids[:1]) == [bos]
        self.start = [bos] if adds_bos else []
        self.empty_context = self.start or [tokenizer.eos_token_id]
        if self.empty_context == [None]:
            raise SeftkitError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        """Token ids of context + continuation, and how many trailing ones are the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            cont = self.encode(continuation)
            ctx = self.empty_context
        else:
            ctx = self.encode(context)
            cont = self.encode(context + continuation)[len(ctx) :]
            ctx = self.start + ctx
        if not cont:
            raise SeftkitError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
        return ctx + cont, len(cont)


def _pack(encoder: _Encoder, item: MCItem, limit: int | None) -> _Row:
    pairs = [encoder.pair(c, k) for c, k in zip(item.contexts, item.continuations, strict=True)]
    seqs = [ids for ids, _ in pairs]
    shared = min(len(ids) for ids in seqs)
    for i in range(shared):
        if any(ids[i] != seqs[0][i] for ids in seqs):
            shared = i
            break
    longest = max(len(ids) for ids in seqs)
    drop = max(0, longest - limit) if limit else 0
    if drop and drop >= min(shared, *(len(ids) - n for ids, n in pairs)):
        raise SeftkitError(f"a question needs {longest} tokens, more than the model's {limit} positions")
    tokens = seqs[0][drop:shared]
    segments = [0] * len(tokens)
    positions = list(range(len(tokens)))
    scored = []
    for k, (ids, n_cont) in enumerate(pairs):
        offset = len(tokens) - shared  # ids[t] sits at row index t - drop in the prefix, offset + t past it
        for t in range(len(ids) - n_cont, len(ids)):
            scored.append((t - 1 - drop if t - 1 < shared else offset + t - 1, ids[t], k))
        tokens += ids[shared:]
        segments += [k + 1] * (len(ids) - shared)
        positions += range(shared - drop, len(ids) - drop)
    return _Row(tokens, segments, positions, scored)


def _forward_rows(model: PreTrainedModel, rows: Sequence[_Row], pad_id: int) -> torch.Tensor:
    """Summed log-prob of every option's continuation, ``[len(rows), max options]`` (unused slots are 0)."""
    import torch

    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    width = max(len(r.tokens) for r in rows)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    ids = torch.tensor([padded(r.tokens, pad_id) for r in rows], device=device)
    pos = torch.tensor([padded(r.positions, 0) for r in rows], device=device)
    seg = torch.tensor([padded(r.segments, -1) for r in rows], device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    allowed = causal & same & (seg[:, :, None] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool, device=device)  # padding attends to itself: no NaN rows
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)

    batch = torch.tensor([b for b, r in enumerate(rows) for _ in r.scored], device=device)
    src = torch.tensor([s for r in rows for s, _, _ in r.scored], device=device)
    target = torch.tensor([t for r in rows for _, t, _ in r.scored], device=device)
    option = torch.tensor([k for r in rows for _, _, k in r.scored], device=device)
    # logits only at the columns some row scores (the documented 1-D form of ``logits_to_keep``), not [B, T, V]
    columns = torch.zeros(width, dtype=torch.bool, device=device)
    columns[src] = True
    kept = torch.nonzero(columns).flatten()
    column_of = columns.cumsum(0) - 1  # sequence position -> its index among the kept columns
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra, where = {"logits_to_keep": kept}, column_of[src]
    else:
        extra, where = {}, src
    logits = model(input_ids=ids, attention_mask=mask[:, None], position_ids=pos, use_cache=False, **extra).logits
    logprobs = torch.log_softmax(logits[batch, where].float(), dim=-1)[torch.arange(len(target), device=device), target]
    n_options = int(option.max()) + 1
    sums = torch.zeros(len(rows) * n_options, dtype=torch.float64, device=device)
    sums.index_add_(0, batch * n_options + option, logprobs.double())
    return sums.view(len(rows), n_options).cpu()


def loglikelihoods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[MCItem],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "scoring",
) -> list[list[float]]:
    """Summed log-probability of each option's continuation, per item (``batch_size`` questions per forward)."""
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise SeftkitError(f"batch size must be at least 1, got {batch_size}")
    encoder = _Encoder(tokenizer)
    limit = max_positions(model)
    rows = [_pack(encoder, item, limit) for item in items]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[list[float]] = [[] for _ in items]
    with torch.inference_mode(), tqdm(total=len(rows), desc=desc, unit="q", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            sums = _forward_rows(model, [rows[i] for i in chunk], pad_id)
            for i, row_sums in zip(chunk, sums.tolist(), strict=True):
                scores[i] = row_sums[: len(items[i].choices)]
            bar.update(len(chunk))
    return scores


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first maximum, like numpy


def score_multiple_choice(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[MCItem],
    batch_size: int = 8,
    task: str = "",
    progress: bool = True,
    per_question: bool = False,
) -> TaskResult:
    """``acc`` picks the option with the highest log-likelihood; ``acc_norm`` divides it by the option's
    character length first (lm-eval's normalisation, which stops long answers from being penalised).
    ``per_question`` keeps each question's 0/1 outcomes in the result."""
    if not items:
        raise SeftkitError(f"task {task or '(unnamed)'} has no questions to score")
    lls = loglikelihoods(model, tokenizer, items, batch_size, progress, desc=task or "scoring")
    hits = [_argmax(ll) == item.gold for ll, item in zip(lls, items, strict=True)]
    norm_hits = [
        _argmax([v / max(n, 1) for v, n in zip(ll, item.norm_lengths, strict=True)]) == item.gold
        for ll, item in zip(lls, items, strict=True)
    ]
    n = len(items)
    acc, acc_norm = sum(hits) / n, sum(norm_hits) / n
    gold = sum(ll[item.gold] for ll, item in zip(lls, items, strict=True)) / n
    chance = sum(1 / len(item.choices) for item in items) / n
    result = TaskResult(task, acc, acc_norm, accuracy_stderr(acc, n), accuracy_stderr(acc_norm, n), n, gold, chance)
    if per_question:
        result.correct, result.correct_norm = [int(h) for h in hits], [int(h) for h in norm_hits]
    return result
