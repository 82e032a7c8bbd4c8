"""SEFT: sparse fine-tuning whose sparse topology evolves while it repairs a pruned model.

Every target linear becomes a :class:`~seftkit.repair.delta.SparseDeltaLinear` with a budget of ``k`` trainable
slots. In the ``accumulation_steps`` backward passes before each boundary (every ``update_interval`` steps)
each layer keeps O(k) gradient statistics; at the boundary :func:`~seftkit.repair.evolution.evolve_layer`
drops the weakest slots, grows new ones where the gradient is largest (reviving pruned weights unless
confined) and, when reviving, gives up as many active weights of least sensitivity so the layer's non-zero
count never changes. ``merge`` folds everything into plain modules with exactly the starting sparsity.

Confined mode (``seft-no-revive``, or any N:M target) grows only inside the active set, which then never
changes, so an N:M pattern always holds.

Distributed (torchrun), the transient dense gradient is averaged over ranks in the accumulation hook before any
statistic is taken, so every rank selects candidates and evolves from the same global gradient: the decisions
are identical by construction, and a hash of every layer's slots and active set is compared across ranks after
each update (a mismatch stops the run). Against one process with the same global batch the gradient differs only
in float summation order, which can still flip near-ties of the top-k selections on a large model (1.4e-4 of
SmolLM2-135M's mask positions after a 4-step run; none on the tiny test models).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from seftkit.distributed import all_reduce_mean_, check_same_across_ranks
from seftkit.errors import SeftkitError
from seftkit.models import linear_weight
from seftkit.repair.config import RepairConfig
from seftkit.repair.delta import SparseDeltaLinear, gather_flat, replace_module
from seftkit.repair.evolution import (
    CANDIDATE_FACTOR,
    SIGNED_CANDIDATE_FACTOR,
    Candidates,
    EvolutionStep,
    Rules,
    bottom_positions,
    candidate_count,
    drop_fraction,
    evolve_layer,
    top_positions,
)
from seftkit.repair.method import RepairMethod
from seftkit.repair.optimizer import SlotAdamW
from seftkit.sparsity.masks import nm_valid
from seftkit.sparsity.pattern import parse_nm

log = logging.getLogger(__name__)

INIT_WINDOW = -1  # the accumulation window of the initial slot choice, before step 0
GRADIENT_INITS = ("grad", "grad-active")


def delta_budget(config: RepairConfig, out_features: int, in_features: int) -> int:
    """Slots for one layer: ``delta_density`` of its weights when given, else ``lora_rank_equivalent`` r
    times (in + out), the parameter count of a rank-r LoRA on that layer (a like-for-like comparison)."""
    if config.delta_density is not None:
        return round(config.delta_density * out_features * in_features)
    return config.lora_rank_equivalent * (in_features + out_features)


@dataclass
class _Layer:
    """One wrapped linear and its evolution bookkeeping (all O(k) besides the module's active mask)."""

    name: str
    module: SparseDeltaLinear
    k: int
    target_nnz: int
    cleared: torch.Tensor  # positions whose non-zero base weight adapt set to 0 (to resume and count revivals)
    window: int | None = None  # the boundary the candidates below are accumulated for
    grow: Candidates | None = None
    sensitivity: Candidates | None = None
    nnz_after: int | None = None  # set by merge
    revived_final: int | None = None  # set by merge

    def revived(self) -> int:
        """Pruned weights brought back to life: non-zero effective weights where the starting base was zero."""
        module = self.module
        zero_at_start = (module.weight == 0).contiguous()
        zero_at_start.view(-1)[self.cleared] = False
        return int((zero_at_start & (module.merged_weight() != 0)).sum())


@dataclass
class _Counts:
    """What topology updates changed, summed over layers (and over boundaries for the totals)."""

    dropped: int = 0
    grown: int = 0
    regrown: int = 0  # dropped slots picked again by growth (kept their values with keep_regrown)
    revived: int = 0
    emptied: int = 0  # dead revived weights (delta dropped, base 0) reclaimed as free places for revivals
    removed_by_sensitivity: int = 0

    def add(self, other: _Counts | EvolutionStep) -> None:
        for name in ("dropped", "grown", "regrown", "revived", "emptied", "removed_by_sensitivity"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class SeftMethod(RepairMethod):
    """Sparse delta fine-tuning with topology evolution (revive mode unless ``config.revive`` is False or
    ``config.nm`` is set)."""

    name = "seft"

    def __init__(self, config: RepairConfig) -> None:
        super().__init__(config)
        self.nm = parse_nm(config.nm) if config.nm else None
        self.revive = config.revive and self.nm is None
        self.layers: list[_Layer] = []
        self.init_event: dict[str, Any] | None = None
        self._model: nn.Module | None = None
        self._requires_grad: dict[str, bool] = {}  # by name: FSDP replaces the parameter objects
        self._init_pending = False
        self._totals = _Counts()
        self._boundaries = 0
        self._merged = False
        self._optimizer: SlotAdamW | None = None

    # -- life cycle -------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, targets: dict[str, nn.Module]) -> None:
        if not targets:
            raise SeftkitError("no target linears to repair; check --include/--exclude")
        self._model = model
        self._requires_grad = {name: param.requires_grad for name, param in model.named_parameters()}
        model.requires_grad_(False)
        generator = torch.Generator().manual_seed(self.config.seed)
        for name, module in targets.items():
            weight = linear_weight(module)
            if self.nm is not None and not nm_valid(weight, *self.nm):
                raise SeftkitError(
                    f"{name} is not {self.config.nm} sparse; prune it with --nm {self.config.nm} before repair"
                )
            active = (weight != 0).contiguous()  # row-major [out, in], also for Conv1D's transposed view
            target_nnz = int(active.sum())
            # every slot lies in the active set after each boundary, so the budget cannot exceed it
            k = min(delta_budget(self.config, *weight.shape), target_nnz)
            active_positions = torch.nonzero(active.view(-1)).flatten()
            if self.config.init == "random":
                pick = torch.randperm(active_positions.numel(), generator=generator)[:k]
                indices = active_positions[pick.to(active_positions.device)]
            else:  # placeholders (values are 0, so T = W) until finish_init picks the real slots
                indices = active_positions[:k]
            wrapped = SparseDeltaLinear(module, indices, active)
            replace_module(model, name, wrapped)
            cleared = torch.empty(0, dtype=torch.long, device=weight.device)
            self.layers.append(_Layer(name, wrapped, k, target_nnz, cleared))
        if self.config.init in GRADIENT_INITS:
            self._init_pending = True
            self._set_window(INIT_WINDOW)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [layer.module.values for layer in self.layers]

    def make_optimizer(self, lr: float, weight_decay: float) -> SlotAdamW:
        """Adam with per-slot bias correction: repurposed slots restart as fresh Adam parameters (see
        :mod:`seftkit.repair.optimizer`)."""
        self._optimizer = SlotAdamW(self.trainable_parameters(), lr=lr, weight_decay=weight_decay)
        return self._optimizer

    def init_passes(self) -> int:
        return self.config.accumulation_steps if self.config.init in GRADIENT_INITS else 0

    def finish_init(self) -> None:
        """Pick the initial slots: the k largest accumulated |dW| (then adapt when reviving)."""
        if not self._init_pending:
            return
        self._set_window(None)
        self.init_event = self._evolve(INIT_WINDOW, optimizer=None)  # before any step: no optimizer state yet
        self._init_pending = False
        if self._optimizer is not None:
            self._scale_revived_slots(self._optimizer)

    def before_backward(self, step: int) -> None:
        if self._init_pending:
            return
        boundary = self._next_boundary(step)
        in_window = boundary is not None and step > boundary - self.config.accumulation_steps
        self._set_window(boundary if in_window else None)

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        if not self.is_boundary(step):
            return None
        self._set_window(None)
        event = self._evolve(step, optimizer)
        return {"step": step, "p": self._drop_fraction(step), **event}

    def merge(self) -> None:
        if self._model is None or self._merged:
            raise RuntimeError("merge() needs an attached, not yet merged SEFT method")
        self._set_window(None)
        for layer in self.layers:
            if int(layer.module.active.sum()) != layer.target_nnz:
                raise RuntimeError(f"{layer.name}: active set has drifted from its target size")
            layer.revived_final = layer.revived()
            base = layer.module.merge_into_base()
            replace_module(self._model, layer.name, base)
            layer.nnz_after = int((layer.module.weight != 0).sum())  # gathered when sharded
        for name, flag in self._requires_grad.items():
            self._model.get_parameter(name).requires_grad_(flag)
        self._merged = True

    # -- boundaries and accumulation --------------------------------------------------------------------

    def is_boundary(self, step: int) -> bool:
        """Topology updates happen after every ``update_interval``-th step, except after the last step."""
        return (step + 1) % self.config.update_interval == 0 and step < self.config.steps - 1

    def _next_boundary(self, step: int) -> int | None:
        boundary = (step // self.config.update_interval + 1) * self.config.update_interval - 1
        return boundary if boundary < self.config.steps - 1 else None

    def _drop_fraction(self, boundary: int) -> float:
        """p(t) after ``boundary + 1`` of ``steps`` optimizer steps."""
        return drop_fraction(boundary + 1, self.config.steps, self.config.drop_rate, self.config.drop_schedule)

    def _revives_at(self, window: int) -> bool:
        """Growth may leave the active set at this update (``--init grad-active`` keeps the initial choice
        inside it, so pruned weights come back only through later, drop-rate-bounded updates)."""
        return self.revive and not (window == INIT_WINDOW and self.config.init == "grad-active")

    def _grow_count(self, layer: _Layer, window: int) -> int:
        """Slots replaced at the update ``window`` (all of them for the initial choice)."""
        return layer.k if window == INIT_WINDOW else math.floor(self._drop_fraction(window) * layer.k)

    def _set_window(self, window: int | None) -> None:
        """Turn gradient accumulation for the update at ``window`` on in every layer (None: off)."""
        for layer in self.layers:
            layer.module.grad_hook = None if window is None else partial(self._accumulate, layer, window)

    @torch.no_grad()
    def _accumulate(self, layer: _Layer, window: int, dense_grad: torch.Tensor, effective: torch.Tensor) -> None:
        """Backward hook: the first pass of a window fixes O(k) candidates, every pass adds to their scores."""
        all_reduce_mean_(dense_grad)  # the global gradient (no-op in one process); backward has taken grad_d
        if layer.window != window:
            self._select_candidates(layer, window, dense_grad, effective)
        layer.grow.add(dense_grad)
        if layer.sensitivity is not None:
            layer.sensitivity.add(dense_grad, effective)

    def _select_candidates(
        self, layer: _Layer, window: int, dense_grad: torch.Tensor, effective: torch.Tensor
    ) -> None:
        n = self._grow_count(layer, window)
        active = layer.module.active.view(-1)
        # Scores are masked in place (no eligibility masks or counts over the matrix: this runs for every layer)
        # and the numbers of eligible positions follow from the invariants: all k slots lie in the active set.
        magnitude = dense_grad.float().abs().view(-1)  # a fresh tensor (abs), ours to overwrite
        taken = 0
        if window != INIT_WINDOW:  # the placeholder slots of the initial choice are fair game
            magnitude.index_fill_(0, layer.module.indices.long(), -math.inf)
            taken = layer.k
        inside_scores = torch.where(active, magnitude, -math.inf)
        signed = self.config.grow_score == "abs-sum"
        factor = SIGNED_CANDIDATE_FACTOR if signed else CANDIDATE_FACTOR
        grow = [top_positions(inside_scores, candidate_count(n, layer.target_nnz - taken, factor))]
        if taken and self.config.keep_regrown:  # every slot competes too, so a dropped one can be picked again
            grow.append(layer.module.indices.long())
        layer.sensitivity = None
        if self._revives_at(window):
            # anywhere for growth, plus the best inside the active set to refill slots that adapt displaces
            grow.append(top_positions(magnitude, candidate_count(n, magnitude.numel() - taken, factor)))
            sensitivity = inside_scores  # reuse the buffer: |T * g| where active, +inf elsewhere
            torch.mul(effective.reshape(-1).float(), dense_grad.reshape(-1).float(), out=sensitivity).abs_()
            sensitivity.masked_fill_(~active, math.inf)
            lowest = [bottom_positions(sensitivity, candidate_count(n, layer.target_nnz))]
            if self.config.eviction == "row":
                lowest.append(_lowest_per_row(sensitivity.view(effective.shape), n, active))
            layer.sensitivity = Candidates.at(torch.unique(torch.cat(lowest)))
        layer.grow = Candidates.at(torch.unique(torch.cat(grow)), signed=signed)
        layer.window = window

    @torch.no_grad()
    def _evolve(self, window: int, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Drop/grow/adapt every layer with the candidates accumulated for ``window``; returns the event."""
        if optimizer is not None and not isinstance(optimizer, SlotAdamW):
            raise TypeError("SEFT restarts and scales single slots; train it with the optimizer from make_optimizer()")
        counts = _Counts()
        for layer in self.layers:
            module = layer.module
            if layer.window != window:
                # no backward pass reached this layer in the window: without statistics a drop would only
                # reset learned values, so its topology stays as it is (the initial choice keeps placeholders)
                log.warning("SEFT: no gradients for %s before update %s; topology unchanged", layer.name, window)
                continue
            grow, sensitivity = layer.grow, layer.sensitivity
            indices = module.indices.long()
            active = module.active.view(-1)
            step = evolve_layer(indices, module.values.abs(), active, grow,
                                self._grow_count(layer, window), sensitivity, module.weight, self._rules(layer))
            module.indices.copy_(indices)
            module.set_active(active)
            module.values[step.repurposed] = 0
            if optimizer is not None:
                optimizer.restart(layer.module.values, step.repurposed)
            if step.removed.numel():
                self._clear(layer, step.removed)
            layer.window, layer.grow, layer.sensitivity = None, None, None
            counts.add(step)
            # the invariants candidate selection relies on (it derives eligible counts from them): a bug if broken
            if not (int(active.sum()) == layer.target_nnz and int(indices.unique().numel()) == layer.k
                    and bool(active[indices].all())):
                raise RuntimeError(f"SEFT update {window} broke {layer.name}'s topology invariants (|active| = "
                                   "target nnz, k unique slots inside the active set); this is a bug, please report "
                                   "it")
        topology = {}
        for layer in self.layers:
            topology[f"{layer.name} slots"] = layer.module.indices
            topology[f"{layer.name} active set"] = layer.module.active_bits
        check_same_across_ranks(f"SEFT's topology after update {window}", topology)
        if optimizer is not None:
            self._scale_revived_slots(optimizer)
        if window != INIT_WINDOW:
            self._totals.add(counts)
            self._boundaries += 1
        else:  # placeholders hold nothing learned: choosing one again is a plain choice, not a regrowth
            counts.regrown = 0
        log.debug("SEFT update at %s: %s", window, counts)
        return dataclasses.asdict(counts)

    def _rules(self, layer: _Layer) -> Rules:
        row_width = layer.module.in_features if self.config.eviction == "row" else None
        return Rules(keep_regrown=self.config.keep_regrown, row_width=row_width)

    def _scale_revived_slots(self, optimizer: SlotAdamW) -> None:
        """Slots on revived positions (base weight 0) learn ``revived_lr_scale`` times faster: they start from
        0 where kept weights start from their pruned-model value."""
        if self.config.revived_lr_scale == 1.0 or not self.revive:
            return
        for layer in self.layers:
            module = layer.module
            revived = gather_flat(module.weight, module.indices) == 0
            scale = torch.where(revived, self.config.revived_lr_scale, 1.0).float()
            optimizer.set_lr_scale(module.values, scale)

    @staticmethod
    def _clear(layer: _Layer, removed: torch.Tensor) -> None:
        """Zero the base weight where adapt removed positions, remembering which were non-zero."""
        was_nonzero = removed[gather_flat(layer.module.weight, removed) != 0]
        layer.cleared = torch.unique(torch.cat([layer.cleared, was_nonzero]))
        layer.module.clear_weights(removed)

    # -- resume and report ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        layers = {}
        for layer in self.layers:
            layers[layer.name] = {
                "indices": layer.module.indices.clone(),
                "active_bits": layer.module.active_bits.clone(),
                "cleared": layer.cleared.clone(),
                "window": layer.window,
                "grow": None if layer.grow is None else _clone_state(layer.grow),
                "sensitivity": None if layer.sensitivity is None else _clone_state(layer.sensitivity),
            }
        return {"init_pending": self._init_pending, "totals": dataclasses.asdict(self._totals),
                "boundaries": self._boundaries, "layers": layers}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [layer.name for layer in self.layers]
        if sorted(state["layers"]) != sorted(names):
            raise SeftkitError("SEFT checkpoint does not match the model's target layers")
        for layer in self.layers:
            saved = state["layers"][layer.name]
            module = layer.module
            module.indices.copy_(saved["indices"])
            module.active_bits.copy_(saved["active_bits"])
            device = module.indices.device
            layer.cleared = saved["cleared"].to(device)
            module.clear_weights(layer.cleared)
            layer.window = saved["window"]
            layer.grow = _restore(saved["grow"], device)
            layer.sensitivity = _restore(saved["sensitivity"], device)
        self._totals = _Counts(**state["totals"])
        self._boundaries = state["boundaries"]
        self._init_pending = state["init_pending"]
        self._set_window(INIT_WINDOW if self._init_pending else None)

    def summary(self) -> dict[str, Any]:
        layers = {}
        for layer in self.layers:
            nnz_after = layer.nnz_after if self._merged else int(layer.module.active.sum())
            revived = layer.revived_final if self._merged else layer.revived()
            layers[layer.name] = {"k": layer.k, "nnz_before": layer.target_nnz, "nnz_after": nnz_after,
                                  "revived": revived}
        revived = sum(entry["revived"] for entry in layers.values())
        return {
            "revive": self.revive,
            "trainable": sum(layer.k for layer in self.layers),
            "revived_weights": revived,
            "boundaries": self._boundaries,
            "updates": dataclasses.asdict(self._totals),
            "init": self.init_event,
            "layers": layers,
        }


def _lowest_per_row(sensitivity: torch.Tensor, n: int, active: torch.Tensor) -> torch.Tensor:
    """Flat positions of each row's least sensitive active weights, enough that row-balanced eviction rarely
    runs out (``sensitivity`` [out, in] with +inf outside the active set)."""
    rows, width = sensitivity.shape
    count = candidate_count(-(-n // rows), width)
    cut = torch.topk(sensitivity, count, dim=1, largest=False).values[:, -1:]  # each row's count-th smallest
    below = sensitivity < cut
    tied = sensitivity == cut  # equal scores at the cut go to the lower positions, as every selection here
    tied &= tied.cumsum(1) <= count - below.sum(1, keepdim=True)
    flat = torch.nonzero((below | tied).view(-1)).flatten()
    return flat[active[flat]]


def _clone_state(candidates: Candidates) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in candidates.state_dict().items()}


def _restore(state: dict[str, torch.Tensor] | None, device: torch.device) -> Candidates | None:
    if state is None:
        return None
    return Candidates.from_state({key: value.to(device, copy=True) for key, value in state.items()})


def no_revive(config: RepairConfig) -> SeftMethod:
    """``seft-no-revive``: growth confined to the active set (the ablation that isolates revival)."""
    return SeftMethod(dataclasses.replace(config, revive=False))
