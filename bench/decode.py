"""End-to-end greedy decode, dense vs sparse kernels, on the same pruned model and the same prompt.

Both runs use one set of pruned weights (the dense model *is* the sparse model, stored densely), so any speed
difference is the kernels, and the generated tokens should be the same: they can only differ where two
candidate tokens are within float rounding of each other, and the report then gives that logit margin.
The speedup is against the fastest dense decode on this CPU: the model in its own dtype and a copy in the other
of bf16/fp32 both run (without native bf16, fp32 dense is often the faster), and the winner is named.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from seftkit.kernels import SparseLinear, sparsify_model
from seftkit.models import linear_weight, load_model, target_linears
from seftkit.prune import prune_model
from seftkit.sparsity.pattern import SparsityPattern

DEFAULT_PROMPT = "The three most important inventions of the industrial revolution were"
COMPARED_TOKENS = 16
DENSE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class DecodeResult:
    model: str
    dtype: str
    backend: str
    prompt: str
    new_tokens: int
    rounds: int
    threads: int
    sparse_layers: int
    target_layers: int
    dense_tokens_per_s: dict[str, float]  # per dense dtype, from its fastest round; prefill included in every run
    fastest_dense: str
    sparse_tokens_per_s: float
    speedup: float  # against the fastest dense
    speedup_median: float
    speedup_same_dtype: float  # against dense in the model's own dtype (whose tokens are compared)
    compared_tokens: int
    identical_tokens: int  # leading greedy tokens that agree
    divergence_margin: float | None  # dense top-1 minus top-2 logit where they first differ
    divergence_margin_ulps: float | None  # that margin in units of the dtype's spacing at the top logit
    prompt_logits_max_diff: float  # teacher-forced on the prompt: how far apart the two models' logits are
    dense_text: str
    sparse_text: str


def load_pruned(spec: str, pattern: SparsityPattern, dtype: str) -> tuple[nn.Module, object]:
    """Load ``spec`` and prune its targeted linears to ``pattern`` by magnitude (a no-op for a model that
    already has that sparsity, since its zeros are its smallest weights)."""
    model, tokenizer = load_model(spec, dtype=dtype)
    prune_model(model, tokenizer, "magnitude", pattern, progress=False)
    return model, tokenizer


def distinct_linear_weights(model: nn.Module) -> tuple[dict[tuple[int, int], torch.Tensor], dict[tuple[int, int], int]]:
    """The first targeted weight of every distinct [out, in] shape, and how many linears have that shape."""
    weights: dict[tuple[int, int], torch.Tensor] = {}
    counts: dict[tuple[int, int], int] = {}
    for module in target_linears(model).values():
        weight = linear_weight(module).detach()
        weights.setdefault(tuple(weight.shape), weight)
        counts[tuple(weight.shape)] = counts.get(tuple(weight.shape), 0) + 1
    return weights, counts


def _generate(model: nn.Module, ids: torch.Tensor, tokens: int, pad_id: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=False, pad_token_id=pad_id)
    return out[0, ids.shape[1]:], time.perf_counter() - start


def _margin(model: nn.Module, ids: torch.Tensor, generated: torch.Tensor, step: int) -> tuple[float, float]:
    """Dense top-1 minus top-2 logit at ``step``, absolute and in ulps of the logits' dtype there."""
    context = torch.cat([ids[0], generated[:step]]).unsqueeze(0)
    logits = model(context).logits[0, -1]
    top = logits.float().topk(2).values
    ulp = float(torch.finfo(logits.dtype).eps) * 2.0 ** float(torch.floor(torch.log2(top[0].abs())))
    return float(top[0] - top[1]), float(top[0] - top[1]) / ulp


def _dense_variants(model: nn.Module) -> tuple[str, dict[str, nn.Module]]:
    """The model under its dtype's name, plus a copy in each other dense dtype the CPU might run faster."""
    dtype = next(model.parameters()).dtype
    own = next((name for name, d in DENSE_DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))
    variants = {own: model}
    for name, d in DENSE_DTYPES.items():
        if name != own:
            variants[name] = copy.deepcopy(model).to(d)
    return own, variants


@torch.no_grad()
def bench_decode(model: nn.Module, tokenizer, model_name: str, tokens: int = 32, rounds: int = 3,
                 backend: str = "auto", prompt: str = DEFAULT_PROMPT, progress: bool = True) -> DecodeResult:
    """Greedy-decode ``tokens`` tokens with ``model`` dense (in bf16 and fp32) and with its linears on sparse
    kernels (``sparsify_model``'s per-batch choice of kernel or dense)."""
    sparse = sparsify_model(copy.deepcopy(model), backend=backend)
    own, dense = _dense_variants(model)
    models = {**{f"dense-{name}": m for name, m in dense.items()}, "sparse": sparse}
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = {name: _generate(m, ids, 2, pad_id)[0] for name, m in models.items()}  # warm-up, kernel choice
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in tqdm(range(rounds), desc="bench decode", unit="round", disable=not progress):
        for name in names[r % len(names):] + names[: r % len(names)]:
            outputs[name], seconds = _generate(models[name], ids, tokens, pad_id)
            times[name].append(seconds)
    reference = f"dense-{own}"
    compared = min(COMPARED_TOKENS, tokens)
    same = (outputs[reference][:compared] == outputs["sparse"][:compared]).int()
    identical = int(same.cumprod(0).sum())
    margin, ulps = _margin(model, ids, outputs[reference], identical) if identical < compared else (None, None)
    logits_diff = float((model(ids).logits.float() - sparse(ids).logits.float()).abs().max())
    best = {name: min(t) for name, t in times.items()}
    fastest = min(dense, key=lambda name: best[f"dense-{name}"])
    return DecodeResult(
        model=model_name,
        dtype=own,
        backend=backend,
        prompt=prompt,
        new_tokens=tokens,
        rounds=rounds,
        threads=torch.get_num_threads(),
        sparse_layers=sum(isinstance(m, SparseLinear) for m in sparse.modules()),
        target_layers=len(target_linears(model)),
        dense_tokens_per_s={name: tokens / best[f"dense-{name}"] for name in dense},
        fastest_dense=fastest,
        sparse_tokens_per_s=tokens / best["sparse"],
        speedup=best[f"dense-{fastest}"] / best["sparse"],
        speedup_median=statistics.median(times[f"dense-{fastest}"]) / statistics.median(times["sparse"]),
        speedup_same_dtype=best[reference] / best["sparse"],
        compared_tokens=compared,
        identical_tokens=identical,
        divergence_margin=margin,
        divergence_margin_ulps=ulps,
        prompt_logits_max_diff=logits_diff,
        dense_text=tokenizer.decode(outputs[reference]),
        sparse_text=tokenizer.decode(outputs["sparse"]),
    )


def format_decode(result: DecodeResult) -> list[str]:
    """Human summary lines for stdout."""
    dense = ", ".join(f"dense {name} {rate:.1f}" for name, rate in result.dense_tokens_per_s.items())
    lines = [
        f"decode {result.model} ({result.dtype}, {result.threads} thread(s), {result.new_tokens} greedy tokens, "
        f"best of {result.rounds} rounds, {result.sparse_layers}/{result.target_layers} linears sparse):",
        f"  {dense}, sparse {result.sparse_tokens_per_s:.1f} tok/s: {result.speedup:.2f}x vs the fastest dense "
        f"({result.fastest_dense}; median {result.speedup_median:.2f}x), {result.speedup_same_dtype:.2f}x vs dense "
        f"{result.dtype}",
        f"  first {result.compared_tokens} tokens identical: {result.identical_tokens}/{result.compared_tokens}; "
        f"prompt logits max |diff| {result.prompt_logits_max_diff:.3g}",
    ]
    if result.divergence_margin is not None:
        lines.append(f"  diverges at token {result.identical_tokens}, where the dense model's top two logits are "
                     f"{result.divergence_margin:.3g} apart ({result.divergence_margin_ulps:.1f} {result.dtype} "
                     "ulp): a rounding-level near-tie, not a kernel error")
    return lines
