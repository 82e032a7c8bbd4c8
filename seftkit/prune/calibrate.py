"""The layer-by-layer calibration loop shared by every pruner that looks at activations (Wanda, SparseGPT).

Instead of re-implementing each architecture's forward pass (what breaks research code on every transformers
release), the model itself runs up to its first decoder block, where a forward pre-hook records exactly what
the model passes in (hidden states, attention mask, rotary ``position_embeddings``, ...) and stops the forward.
From then on only one block is live at a time: its target linears' inputs are summarised by forward pre-hooks,
the linears are pruned, and the block is run again so that the next block sees the *pruned* outputs.
Activations for all calibration samples are held once (in the model dtype, on the compute device or on the
CPU), updated in place block by block, so memory does not grow with the number of layers.

Under torch.distributed (see :mod:`seftkit.distributed`) each rank runs its own share of the calibration
windows through the blocks and the additive statistics are summed over ranks before any mask is chosen, so every
rank prunes exactly as one process would (up to float summation order) and identically to the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from seftkit.distributed import all_reduce_sum_, shard_rows, world
from seftkit.errors import SeftkitError
from seftkit.models import find_linears, linear_weight
from seftkit.sparsity.targets import TargetRule

Statistic = Callable[[torch.Tensor], torch.Tensor]
"""An additive summary of a batch of linear inputs ``[tokens, in]`` (summed over batches, then averaged)."""

PruneLinear = Callable[[str, nn.Module, torch.Tensor], None]
"""Prunes one linear in place given its full name and the mean of its input statistic."""


class BlockResidency(Protocol):
    """Where block weights live while the loop runs: :mod:`seftkit.prune.streaming` loads each block's tensors
    just before the block is used and releases them (writing them out pruned) right after, so only one block is
    resident; the rest of the model is released once the block inputs are captured. ``None`` in
    :func:`prune_blockwise` means every weight is already in memory."""

    def load(self, index: int) -> None: ...

    def release(self, index: int) -> None: ...

    def inputs_captured(self) -> None: ...


class _StopForward(Exception):
    """Raised from a forward pre-hook once everything needed from this forward is recorded."""


Extras = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass
class BlockInputs:
    """The inputs of the current decoder block for every calibration sample.

    ``hidden`` is ``[nsamples, seqlen, hidden]``. ``extras[batch_size][block]`` holds the other positional and
    keyword arguments the model passed to that block for a batch of that size: masks and rotary embeddings
    depend on the batch shape and, in models that mix sliding-window and global attention (Gemma 2/3, Qwen 3),
    on the layer. The model computes them once per forward, so these are references to shared tensors, and at
    most two batch sizes occur (full batches and the last one).
    """

    hidden: torch.Tensor
    extras: dict[int, list[Extras]]
    batch_size: int
    device: torch.device

    def batches(self, block: int) -> Iterator[tuple[slice, torch.Tensor, tuple[Any, ...], dict[str, Any]]]:
        total = self.hidden.shape[0]
        for start in range(0, total, self.batch_size):
            rows = slice(start, min(start + self.batch_size, total))
            args, kwargs = self.extras[rows.stop - rows.start][block]
            yield rows, self.hidden[rows].to(self.device), args, kwargs


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def activation_device(device: torch.device, numel: int, dtype: torch.dtype) -> torch.device:
    """Keep activations next to the model unless they would take more than a quarter of its free memory."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    needed = numel * torch.empty((), dtype=dtype).element_size()
    return device if needed < free // 4 else torch.device("cpu")


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int
) -> BlockInputs:
    """Run the model on ``windows`` ``[n, seqlen]`` and record what its decoder blocks receive.

    Block 0's hidden states are kept for every sample, and the forward stops there, except for the first batch
    of each size, which runs on to the last block so that every block's own mask and rotary arguments are seen.
    Only the model's own code runs in that pass: blocks after the first pass their input through (they are not
    computed, and need no weights), since their arguments other than the hidden states do not depend on it.
    """
    device = model_device(model)
    state: dict[str, Any] = {"hidden": None}
    extras: dict[int, list[Extras]] = {}
    first_output: list[Any] = []

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        shape = first_output[-1]  # what block 0 returned: a tensor, or a tuple led by the hidden states
        return hidden if isinstance(shape, torch.Tensor) else (hidden, *[None] * (len(shape) - 1))

    def recorder(index: int) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                if state["hidden"] is None:
                    shape = (windows.shape[0], *hidden.shape[1:])
                    store = activation_device(device, int(torch.Size(shape).numel()), hidden.dtype)
                    state["hidden"] = torch.empty(shape, dtype=hidden.dtype, device=store)
                state["hidden"][state["rows"]] = hidden.to(state["hidden"].device)
            if state["recording"]:
                extras[hidden.shape[0]].append((tuple(args[1:]), kwargs))
            if not state["recording"] or index == len(layers) - 1:
                raise _StopForward

        return record

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(layers)]
    handles.append(layers[0].register_forward_hook(lambda _module, _args, output: first_output.append(output)))
    own_forwards = [block.__dict__.get("forward") for block in layers]  # e.g. accelerate's hooks set one
    for block in layers[1:]:
        block.forward = passthrough
    try:
        for start in range(0, windows.shape[0], batch_size):
            rows = slice(start, min(start + batch_size, windows.shape[0]))
            size = rows.stop - rows.start
            state.update(rows=rows, recording=size not in extras)
            extras.setdefault(size, [])
            try:
                model(windows[rows].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
        for block, forward in zip(layers[1:], own_forwards[1:], strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
    return BlockInputs(hidden=state["hidden"], extras=extras, batch_size=batch_size, device=device)


class InputStatistics:
    """Sums a statistic of each hooked linear's inputs over all calibration tokens.

    Forward pre-hooks see the inputs; once every hooked linear has seen the current batch nothing else in the
    block matters, so the last hook stops the block (the stats pass skips e.g. the down projection and the rest
    of the block). Linears fed the very same tensor (q/k/v, gate/up) share one statistic computation per batch.
    """

    def __init__(self, linears: dict[str, nn.Module], statistic: Statistic) -> None:
        self.statistic = statistic
        self.linears = linears
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._seen: set[str] = set()
        self._count = len(linears)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in linears.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if self._last is None or self._last[0] is not x:
                self._last = (x, self.statistic(x.reshape(-1, x.shape[-1])))
            update = self._last[1]
            if name in self.sums:
                self.sums[name] += update
            else:
                self.sums[name] = update.clone()
            self.tokens[name] = self.tokens.get(name, 0) + x.numel() // x.shape[-1]
            self._seen.add(name)
            if len(self._seen) == self._count:
                self._seen.clear()
                self._last = None
                raise _StopForward

        return hook

    def collect(self, block: nn.Module, index: int, inputs: BlockInputs) -> None:
        """Run every calibration batch through ``block`` (number ``index``) just far enough to see all hooked
        inputs."""
        for _, hidden, args, kwargs in inputs.batches(index):
            try:
                block(hidden, *args, **kwargs)
            except _StopForward:
                continue
            self._seen.clear()  # some hooked linear sat this batch out (e.g. an unrouted expert)
            self._last = None

    def all_reduce(self) -> None:
        """Sum every rank's statistics and token counts (a no-op in one process).

        A linear that saw no input on this rank contributes the statistic of an empty batch, so all ranks take
        part in the same collectives in the same order.
        """
        if not world().distributed:
            return
        for name, module in self.linears.items():
            if name not in self.sums:
                weight = linear_weight(module)
                self.sums[name] = self.statistic(weight.new_zeros((0, weight.shape[1])))
                self.tokens[name] = 0
            all_reduce_sum_(self.sums[name])
        device = next(iter(self.sums.values())).device
        counts = torch.tensor([self.tokens[name] for name in self.linears], dtype=torch.float64, device=device)
        for name, count in zip(self.linears, all_reduce_sum_(counts).tolist(), strict=True):
            self.tokens[name] = int(count)
            if not count:
                del self.sums[name]

    def mean(self, name: str) -> torch.Tensor:
        if name not in self.sums:
            raise SeftkitError(f"{name} received no calibration input; exclude it with --exclude")
        return self.sums[name] / self.tokens[name]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None


@torch.no_grad()
def run_block(block: nn.Module, index: int, inputs: BlockInputs) -> None:
    """Run every calibration batch through ``block`` (number ``index``) and replace its inputs by its outputs."""
    for rows, hidden, args, kwargs in inputs.batches(index):
        out = block(hidden, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        inputs.hidden[rows] = out.to(inputs.hidden.device)


@torch.no_grad()
def prune_blockwise(
    model: nn.Module,
    layers_name: str,
    layers: nn.ModuleList,
    windows: torch.Tensor,
    rule: TargetRule,
    statistic: Statistic,
    prune_linear: PruneLinear,
    batch_size: int = 8,
    progress: bool = True,
    residency: BlockResidency | None = None,
) -> int:
    """Prune the target linears of every decoder block from statistics of their (already pruned) inputs.

    Returns the peak resident memory in bytes sampled after each block (psutil RSS). Distributed, each rank
    takes its share of ``windows`` (the same full tensor on every rank). ``residency`` keeps only the current
    block in memory (see :class:`BlockResidency`).
    """
    if windows.shape[0] < world().world_size:
        raise SeftkitError(f"{windows.shape[0]} calibration windows cannot be shared by {world().world_size} "
                           "processes; raise --nsamples")
    windows = windows[shard_rows(windows.shape[0])]
    process = psutil.Process()
    if residency is not None:
        residency.load(0)  # the capture runs block 0 only
    inputs = capture_block_inputs(model, layers, windows, batch_size)
    peak_rss = process.memory_info().rss
    if residency is not None:
        residency.inputs_captured()
    for index, block in enumerate(tqdm(layers, desc="prune blocks", unit="block", disable=not progress)):
        if residency is not None and index > 0:
            residency.load(index)
        prefix = f"{layers_name}.{index}."
        linears = {prefix + name: module for name, module in find_linears(block, rule, prefix=prefix).items()}
        if linears:
            stats = InputStatistics(linears, statistic)
            try:
                stats.collect(block, index, inputs)
                stats.all_reduce()
            finally:
                stats.remove()
            for name, module in linears.items():
                prune_linear(name, module, stats.mean(name))
            del stats
        if index + 1 < len(layers):
            run_block(block, index, inputs)
        peak_rss = max(peak_rss, process.memory_info().rss)
        if residency is not None:
            residency.release(index)
    return peak_rss
