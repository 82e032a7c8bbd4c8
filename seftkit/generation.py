"""Generate text from a (sparse) model on the native sparse kernels, timing prefill and decode apart.

``generate(model, prompt)`` loads the model, swaps its sparse linears for the CPU kernels
(:func:`seftkit.kernels.sparsify_model`), applies the chat template when the tokenizer has one, and runs
``transformers``' own ``generate``: greedy decoding is then the same algorithm as dense transformers, so on the
same weights it picks the same tokens. Prefill (the prompt's forward and the first token) and decode (every
later token) are timed apart because they stress the kernels differently: prefill multiplies many rows at
once, decode one row per step, which is where streaming fewer weight bytes pays.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from seftkit.errors import SeftkitError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GENERATE_BACKENDS = ("auto", "sparse", "dense")


@dataclass(frozen=True)
class GenerateConfig:
    """How to generate; validated on construction so bad options fail before any model is loaded.

    ``backend``: ``auto`` puts each targeted linear on the sparse kernels where its packed form streams fewer
    bytes than the dense weight (else keeps it dense); ``sparse`` does the same but fails when no layer ends up
    on the kernels (a dense model, or no kernels on this machine); ``dense`` is plain transformers.
    """

    max_new_tokens: int = 64
    backend: str = "auto"
    threads: int | None = None
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    chat_template: bool = True
    dtype: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        from seftkit.models import resolve_dtype

        if self.backend not in GENERATE_BACKENDS:
            raise SeftkitError(f"unknown backend {self.backend!r}: use one of {', '.join(GENERATE_BACKENDS)}")
        if self.max_new_tokens < 1:
            raise SeftkitError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.threads is not None and self.threads < 1:
            raise SeftkitError(f"--threads must be at least 1, got {self.threads}")
        if not self.temperature > 0:
            raise SeftkitError(f"--temperature must be above 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SeftkitError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.sample and (self.temperature != 1.0 or self.top_p != 1.0):
            raise SeftkitError("--temperature and --top-p apply with --sample only (the default is greedy)")
        resolve_dtype(self.dtype)


@dataclass
class GenerateReport:
    """What was generated and how fast (``--json``)."""

    model: str
    backend: str
    dtype: str
    threads: int
    sampled: bool
    chat_template: bool
    sparse_layers: int
    target_layers: int
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens_per_s: float  # prompt tokens over the time to the first new token
    decode_tokens_per_s: float  # tokens after the first over the time they took; 0 when only one was made
    text: str
    tokens: list[int] = field(default_factory=list)


class StepClock:
    """A ``generate`` streamer that only notes when each new token arrives (the first call is the prompt)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.arrivals: list[float] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self._seen_prompt:
            self.arrivals.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chat_template: bool) -> tuple[torch.Tensor, bool]:
    """The prompt's token ids (through the chat template when asked and the tokenizer has one) and whether the
    template was applied."""
    use_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    if use_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        # the template already holds the special tokens (BOS, role markers)
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids, True
    return tokenizer(prompt, return_tensors="pt").input_ids, False


def prepare_model(model: PreTrainedModel, backend: str, in_place: bool = False) -> tuple[PreTrainedModel, int, int]:
    """``model`` with its sparse linears on the kernels (swapped in a copy unless ``in_place``), and how many of
    its targeted linears run there."""
    from seftkit.kernels import SparseLinear, sparsify_model
    from seftkit.models import target_linears

    targets = len(target_linears(model))
    if backend == "dense":
        return model, 0, targets
    swapped = sparsify_model(model if in_place else copy.deepcopy(model), backend="auto")
    on_kernels = sum(isinstance(m, SparseLinear) for m in swapped.modules())
    if backend == "sparse" and on_kernels == 0:
        raise SeftkitError("--backend sparse: no targeted linear runs on the sparse kernels (the model is not "
                           "sparse enough to gain from them, or they cannot be built here); use --backend dense")
    return swapped, on_kernels, targets


def generate(
    model: str | os.PathLike | PreTrainedModel,
    prompt: str,
    max_new_tokens: int = 64,
    tokenizer: PreTrainedTokenizerBase | None = None,
    config: GenerateConfig | None = None,
    **options: object,
) -> GenerateReport:
    """Generate up to ``max_new_tokens`` tokens after ``prompt``; returns the text, tokens and speeds.

    ``model`` is a folder or built-in name (loaded here) or a loaded model (then pass its ``tokenizer``).
    Other options are the fields of :class:`GenerateConfig` (``backend``, ``threads``, ``sample``, ...).
    """
    import torch

    from seftkit.models import load_model

    config = config or GenerateConfig(max_new_tokens=max_new_tokens, **options)
    loaded_here = isinstance(model, (str, os.PathLike))
    if loaded_here:
        name = str(model)
        model, tokenizer = load_model(model, device=config.device, dtype=config.dtype)
    else:
        name = type(model).__name__
        if tokenizer is None:
            raise SeftkitError("generate() with a loaded model needs its tokenizer")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    # a model we loaded is ours to swap; a caller's model stays as it was
    runner, on_kernels, targets = prepare_model(model, config.backend, in_place=loaded_here)
    ids, templated = prompt_ids(tokenizer, prompt, config.chat_template)
    ids = ids.to(next(runner.parameters()).device)
    saved_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        if on_kernels:
            _warm_up(runner, ids)
        new, clock = _run(runner, tokenizer, ids, config)
    finally:
        torch.set_num_threads(saved_threads)
    threads = config.threads or saved_threads
    prefill = clock.arrivals[0] - clock.start
    decode = clock.arrivals[-1] - clock.arrivals[0]
    return GenerateReport(
        model=name, backend=config.backend, dtype=dtype,
        threads=threads, sampled=config.sample, chat_template=templated, sparse_layers=on_kernels,
        target_layers=targets, prompt_tokens=ids.shape[1], new_tokens=len(new), prefill_seconds=prefill,
        decode_seconds=decode, prefill_tokens_per_s=ids.shape[1] / prefill,
        decode_tokens_per_s=(len(new) - 1) / decode if len(new) > 1 else 0.0,
        text=tokenizer.decode(new, skip_special_tokens=True), tokens=new)


def _warm_up(model: PreTrainedModel, ids: torch.Tensor) -> None:
    """One prompt-length and one single-token forward, so the kernels' sparse-or-dense timing for both batch
    sizes happens here and not inside the timed prefill."""
    import torch

    with torch.no_grad():
        model(ids, use_cache=False)
        model(ids[:, -1:], use_cache=False)


def _run(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor,
         config: GenerateConfig) -> tuple[list[int], StepClock]:
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # top_k 0 switches off transformers' default top-50 cut, so --top-p alone decides the candidates
    sampling = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "top_k": 0} \
        if config.sample else {"do_sample": False}
    clock = StepClock()
    devices = [ids.device] if ids.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the caller's random state is left alone
        torch.manual_seed(config.seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=config.max_new_tokens,
                             pad_token_id=pad_id, streamer=clock, **sampling)
    return out[0, ids.shape[1]:].tolist(), clock
