"""The one repair training loop. Every method runs through it; it never looks at a method's name.

Choices, and why:
- AdamW over ``method.trainable_parameters()`` only (``method.make_optimizer``; SEFT's counts Adam's bias
  correction per slot), so optimizer memory is what the method costs.
- Learning rate: linear warmup over ``warmup_steps``, then linear decay to 0 at ``steps``. A pure function of the
  step (no scheduler object), so a resumed run gets exactly the same rates. ``max_grad_norm`` clips the global
  gradient norm of the trainable parameters, as HF Trainer's option of that name does (off unless given).
- Micro-batch ``i`` is fixed by the seed (``batches``); every method trains on the same tokens in the same order.
  Methods that probe gradients before training (SEFT's initial slots) use the first micro-batches of that same
  stream, without an optimizer step, so they see no extra data.
- A non-finite loss stops the run before the optimizer step that would spread it (:class:`DivergenceError`);
  the last checkpoint written is the last good state.
- After ``merge`` every target layer must hold at most its input nnz (and a valid N:M pattern with ``--nm``);
  otherwise nothing is returned for saving.
- Under torch.distributed (``torchrun``, see :mod:`seftkit.distributed`) the model is replicated with DDP, or
  with ``strategy="fsdp"`` its weights are sharded with FSDP2 (:mod:`seftkit.repair.sharding`; the small trainable
  state stays replicated and its gradients are averaged on a step's last micro-batch, like DDP's). Either way
  every global micro-batch is ``batch_size x world_size`` windows of which each rank trains on its slice, so N
  processes with ``--batch-size B`` train like one with ``N*B`` (exactly so for text windows; with task data each
  rank averages over its own answer tokens, as DDP does); DDP synchronises gradients only on a step's last
  micro-batch; the loss curve is the mean over ranks. Methods attach to the inner module before it is wrapped
  or sharded, so their hooks and decisions are unaware of DDP/FSDP (SEFT makes its topology decisions from
  gradients averaged over ranks).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from seftkit.distributed import World, all_reduce_mean_, shard_rows, world
from seftkit.errors import DivergenceError, SeftkitError
from seftkit.models import check_finite, cpu_runs_bf16_natively, linear_weight, target_linears
from seftkit.repair.batches import TrainBatches, build_batches
from seftkit.repair.checkpoint import Progress, has_checkpoint, input_digests, load_checkpoint, save_checkpoint
from seftkit.repair.config import RepairConfig
from seftkit.repair.loss import causal_lm_loss
from seftkit.repair.method import RepairMethod
from seftkit.repair.registry import build_method
from seftkit.repair.report import LayerSparsity, RepairReport
from seftkit.repair.sharding import (
    allocate_gather_buffers,
    average_gradients_,
    full_linear_weight,
    shard_model,
    uses_fsdp,
)
from seftkit.sparsity.masks import nm_valid
from seftkit.sparsity.pattern import parse_nm
from seftkit.sparsity.targets import TargetRule

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def learning_rate(config: RepairConfig, step: int) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then linear decay to 0 at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    remaining = config.steps - config.warmup_steps
    return config.lr * (config.steps - step) / remaining if remaining > 0 else config.lr


def peak_rss_mb() -> float:
    """High-water resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def measure_layers(targets: dict[str, nn.Module]) -> dict[str, LayerSparsity]:
    return {name: LayerSparsity(numel=linear_weight(m).numel(), nnz_before=int(torch.count_nonzero(linear_weight(m))))
            for name, m in targets.items()}


def check_input_pattern(targets: dict[str, nn.Module], nm: str | None) -> None:
    if nm is None:
        return
    n, m = parse_nm(nm)
    for name, module in targets.items():
        if not nm_valid(linear_weight(module).detach(), n, m):
            raise SeftkitError(f"{name} is not {nm} sparse; prune with --nm {nm} before repairing with --nm")


def check_output_sparsity(model: nn.Module, layers: dict[str, LayerSparsity], nm: str | None) -> None:
    """Fill ``nnz_after``; refuse a merged model that is denser than its input or breaks N:M."""
    pattern = parse_nm(nm) if nm else None
    for name, layer in layers.items():
        weight = full_linear_weight(model.get_submodule(name)).detach()
        layer.nnz_after = int(torch.count_nonzero(weight))
        if layer.nnz_after > layer.nnz_before:
            raise SeftkitError(f"repair left {name} with {layer.nnz_after} non-zeros, more than its input's "
                               f"{layer.nnz_before}; nothing was written (this is a bug, please report it)")
        if pattern is not None and not nm_valid(weight, *pattern):
            raise SeftkitError(f"repair broke the {nm} pattern of {name}; nothing was written (a bug, please report)")


def overall_sparsity(layers: dict[str, LayerSparsity], after: bool) -> float:
    numel = sum(layer.numel for layer in layers.values())
    nnz = sum((layer.nnz_after if after else layer.nnz_before) or 0 for layer in layers.values())
    return 1.0 - nnz / numel


def evaluate_model(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: RepairConfig, progress: bool
) -> dict[str, float]:
    """``--eval-ppl`` perplexity and ``--eval-tasks`` accuracy (on the tasks' ``heldout`` split, which repair
    never trains on), flattened for the report; empty when neither is asked for."""
    if not config.eval_ppl and not config.eval_tasks:
        return {}
    from seftkit.eval import evaluate
    from seftkit.models import eval_mode

    with eval_mode(model):
        result = evaluate(model, tokenizer, tasks=config.eval_tasks or None, ppl_texts=config.eval_ppl,
                          limit=config.eval_limit, split="heldout", progress=progress,
                          ppl_windows=config.eval_windows)
    scores = {"ppl": result.ppl.ppl} if result.ppl is not None else {}
    scores.update({f"{name}_acc": task.acc for name, task in result.tasks.items()})
    if result.mean_acc is not None:
        scores["mean_acc"] = result.mean_acc
    if len(result.tasks) > 1:
        scores.update(micro_acc=result.micro_acc, gold_loglik=result.gold_loglik)
    return scores


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """HF activation (gradient) checkpointing, non-reentrant so frozen inputs need no ``requires_grad``;
    transformers 5 renamed the methods (the old names warn)."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def replicate(model: nn.Module, ranks: World, device: torch.device) -> nn.Module:
    """The module the training loop runs forward/backward through: DDP around ``model`` when distributed.

    Buffers are not re-broadcast every forward (SEFT's masks are identical on every rank by construction, and
    checked at each update); DDP's start-up broadcast of rank 0's weights still makes every replica equal.
    """
    if not ranks.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def gradient_sync(model: nn.Module, sync: bool) -> AbstractContextManager:
    """DDP's ``no_sync`` unless ``sync``: gradients are all-reduced once per step, after its last micro-batch
    (FSDP's own reductions likewise; with every base weight frozen it has none)."""
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(sync)
    return model.no_sync() if isinstance(model, DistributedDataParallel) and not sync else nullcontext()


def global_loss(loss: torch.Tensor) -> float:
    """The loss averaged over ranks (every rank holds the same number of windows), for checks and the curve."""
    return all_reduce_mean_(loss.detach().clone()).item()


def micro_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Causal LM loss (labels shifted, -100 skipped; the head chunked, see :mod:`seftkit.repair.loss`), under
    bf16 autocast on CUDA."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return causal_lm_loss(model, batch).float()


@dataclasses.dataclass
class _Run:
    """What the phases of one :func:`repair_model` call share."""

    config: RepairConfig
    ranks: World
    device: torch.device
    sharded: bool
    progress: bool
    targets: dict[str, nn.Module]
    layers: dict[str, LayerSparsity]
    inputs: dict[str, str]  # input weight digests, when checkpointing (a resume must start from the same model)


def repair_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: RepairConfig,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> RepairReport:
    """Repair ``model`` in place with ``config.method``; returns the report. The model ends as a plain HF model.

    ``checkpoint_dir`` receives a checkpoint every ``config.checkpoint_every`` steps (and ``resume`` continues
    from it). ``stop_after`` ends training after that many steps without merging, as a kill would (tests).
    Settings are checked before the model is touched; an error during training (e.g. :class:`DivergenceError`)
    leaves the model mid-repair, so reload it before using it again.
    """
    config.validate()  # again: a config may have been changed since it was built
    if world().is_main and (ignored := config.ignored_options()):
        log.warning("warning: --method %s does not use %s%s", config.method, ", ".join(ignored),
                    " (with --nm nothing revives)" if config.nm else "")
    started = time.perf_counter()
    run = start_run(model, config, checkpoint_dir is not None, progress)
    method = build_method(run.config)
    report = new_report(model, run)
    attach_method(model, tokenizer, method, run, report)
    state = fit(model, tokenizer, method, run, report, checkpoint_dir, resume, stop_after)
    if stop_after is not None and state.step < config.steps:
        return report  # interrupted on purpose: no merge, the checkpoint holds the run
    finish(model, tokenizer, method, run, report)
    report.wall_time_s = time.perf_counter() - started
    return report


def start_run(model: nn.Module, config: RepairConfig, checkpointing: bool, progress: bool) -> _Run:
    """Where the run trains, which linears it repairs, and their input nnz; refuses a model it cannot repair."""
    ranks = world()
    sharded = uses_fsdp(config.strategy)
    # sharded, the model may still be in CPU memory: fully_shard moves each rank's shards to its device
    device = torch.device(ranks.device) if sharded else next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    targets = target_linears(model, TargetRule(config.include, config.exclude))
    if not targets:
        raise SeftkitError("no target linears matched; check --include/--exclude")
    check_finite(model)
    check_input_pattern(targets, config.nm)
    if ranks.is_main and device.type == "cpu" and linear_weight(next(iter(targets.values()))).dtype == torch.bfloat16 \
            and not cpu_runs_bf16_natively():
        log.warning("this CPU has no native bf16: torch's bf16 matmuls run several times slower than fp32 here; "
                    "--dtype fp32 trains faster at twice the weight memory")
    if ranks.distributed:  # record what ran (under an accelerate FSDP launch None means fsdp)
        config = dataclasses.replace(config, strategy="fsdp" if sharded else "ddp")
    return _Run(config, ranks, device, sharded, progress and ranks.is_main, targets, measure_layers(targets),
                input_digests(targets) if checkpointing else {})


def new_report(model: nn.Module, run: _Run) -> RepairReport:
    config = run.config
    report = RepairReport(config=config, method=config.method, trainable_params=0,
                          total_params=sum(p.numel() for p in model.parameters()), device=str(run.device),
                          layers=run.layers, sparsity_before=overall_sparsity(run.layers, after=False))
    report.processes = run.ranks.world_size
    report.global_batch_size = config.batch_size * run.ranks.world_size * config.grad_accum
    return report


def attach_method(model: nn.Module, tokenizer: PreTrainedTokenizerBase, method: RepairMethod, run: _Run,
                  report: RepairReport) -> None:
    """Evaluate the input model (when asked), then wrap its target linears (and shard it under FSDP)."""
    if run.ranks.is_main and not run.sharded:  # the others would only repeat it; they wait at DDP's broadcast
        report.eval_before = evaluate_model(model, tokenizer, run.config, run.progress)
    torch.manual_seed(run.config.seed)
    method.attach(model, run.targets)
    if run.sharded:
        shard_model(model, method.trainable_parameters(), run.device)
        allocate_gather_buffers(model, run.device)
        # every rank runs the sharded forward; the method's update starts at zero, so this is the input model
        report.eval_before = evaluate_model(model, tokenizer, run.config, run.progress)
    report.trainable_params = method.trainable_count()


def fit(model: nn.Module, tokenizer: PreTrainedTokenizerBase, method: RepairMethod, run: _Run,
        report: RepairReport, checkpoint_dir: Path | None, resume: bool, stop_after: int | None) -> Progress:
    """The optimizer steps (from a checkpoint when resuming, else after the method's gradient probes)."""
    config = run.config
    optimizer = method.make_optimizer(config.lr, config.weight_decay)
    global_batch = config.batch_size * run.ranks.world_size
    batches = build_batches(tokenizer, config.data, config.seqlen, global_batch,
                            max(config.steps * config.grad_accum, method.init_passes()), config.seed,
                            rows=shard_rows(global_batch), max_per_task=config.max_per_task)
    replica = model if run.sharded else replicate(model, run.ranks, run.device)
    was_training = model.training
    model.train()
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    try:
        if resume and checkpoint_dir is not None and has_checkpoint(checkpoint_dir):
            state = load_checkpoint(checkpoint_dir, config, method, optimizer, run.inputs)
            report.resumed_from_step = state.step
            log.info("resuming %s from step %d (%s)", config.method, state.step, checkpoint_dir)
        else:
            if resume:
                log.info("no checkpoint in %s; starting %s from step 0", checkpoint_dir, config.method)
            state = Progress(inputs=run.inputs)
            run_init_passes(replica, method, batches, run.device)
        seconds = train(replica, method, optimizer, batches, config, state, run.device, checkpoint_dir,
                        run.progress, stop_after, density=1.0 - report.sparsity_before, average_gradients=run.sharded)
    finally:
        if config.gradient_checkpointing:
            set_activation_checkpointing(model, False)
        model.train(was_training)
    report.steps_done = state.step
    report.loss_curve = state.loss_curve
    report.events = state.events
    steps_run = state.step - (report.resumed_from_step or 0)
    report.train_time_s = seconds
    report.step_time_s = seconds / steps_run if steps_run else 0.0
    return state


def finish(model: nn.Module, tokenizer: PreTrainedTokenizerBase, method: RepairMethod, run: _Run,
           report: RepairReport) -> None:
    """Merge into plain modules, check every layer's nnz and pattern, evaluate the result, record memory."""
    method.merge()
    check_output_sparsity(model, run.layers, run.config.nm)
    report.sparsity_after = overall_sparsity(run.layers, after=True)
    report.method_summary = method.summary()
    if run.ranks.is_main or run.sharded:  # a sharded forward needs every rank
        report.eval_after = evaluate_model(model, tokenizer, run.config, run.progress)
    report.peak_rss_mb = peak_rss_mb()
    if run.device.type == "cuda":
        report.peak_cuda_mb = torch.cuda.max_memory_allocated(run.device) / 2**20


def check_loss(loss: float, when: str, checkpoint_dir: Path | None) -> None:
    """Stop on a NaN/inf loss before its backward and optimizer step can spread it into the weights (given the
    loss averaged over ranks, every rank stops together)."""
    if not math.isfinite(loss):
        kept = (f"the last good checkpoint is kept in {checkpoint_dir}"
                if checkpoint_dir is not None and has_checkpoint(checkpoint_dir) else "no checkpoint")
        raise DivergenceError(f"loss became {loss} {when}; try a lower --lr ({kept})")


def run_init_passes(model: nn.Module, method: RepairMethod, batches: TrainBatches, device: torch.device) -> None:
    """Gradient probes before training (e.g. SEFT's initial slots): backward passes, no optimizer step (nor
    DDP gradient sync: the gradients are discarded)."""
    passes = method.init_passes()
    for index in range(passes):
        method.before_backward(0)
        with gradient_sync(model, sync=False):
            loss = micro_batch_loss(model, batches.micro_batch(index), device)
            check_loss(global_loss(loss), "before the first step", None)
            (loss / passes).backward()
    if passes:
        method.finish_init()
        model.zero_grad(set_to_none=True)


def train(model: nn.Module, method: RepairMethod, optimizer: torch.optim.Optimizer, batches: TrainBatches,
          config: RepairConfig,
          state: Progress, device: torch.device, checkpoint_dir: Path | None, progress: bool,
          stop_after: int | None, density: float, average_gradients: bool = False) -> float:
    """Run steps ``state.step .. config.steps - 1`` (updating ``state``); returns the seconds spent training.

    ``average_gradients`` all-reduces the trainable parameters' gradients before each optimizer step (under
    FSDP, which leaves these replicated parameters to seftkit).

    The progress bar shows the loss, seconds per step and ``density``, the fraction of target weights in the
    active set: every method holds it at the input's (SEFT's evolving set keeps its size at every boundary).
    """
    last_step = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(total=config.steps, initial=state.step, desc=f"repair {config.method}", unit="step", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    seconds, done = 0.0, 0
    try:
        while state.step < last_step:
            step = state.step
            tick = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            total = 0.0
            for micro in range(config.grad_accum):
                method.before_backward(step)  # before the forward: autograd functions capture hooks there
                with gradient_sync(model, sync=micro == config.grad_accum - 1):
                    loss = micro_batch_loss(model, batches.micro_batch(step * config.grad_accum + micro), device)
                    value = global_loss(loss)
                    check_loss(value, f"at step {step}", checkpoint_dir)
                    (loss / config.grad_accum).backward()
                total += value / config.grad_accum
            if average_gradients:
                average_gradients_(method.trainable_parameters())
            if config.max_grad_norm is not None:  # after any averaging: every rank clips the same global gradient
                torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), config.max_grad_norm)
            optimizer.step()
            event = method.after_optimizer_step(step, optimizer)
            optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - tick
            state.step += 1
            state.loss_curve.append((step, total))
            if event is not None:
                state.events.append({"step": step, **event})
            done += 1
            if done == 1 or state.step % config.log_every == 0:
                bar.set_postfix(loss=f"{total:.4f}", s_step=f"{seconds / done:.2f}", density=f"{density:.4f}")
            bar.update(1)
            if checkpoint_dir is not None and config.checkpoint_every and state.step % config.checkpoint_every == 0:
                save_checkpoint(checkpoint_dir, config, method, optimizer, state)
    finally:
        bar.close()
    return seconds
