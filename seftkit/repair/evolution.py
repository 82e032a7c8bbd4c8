"""SEFT topology evolution for one layer: drop, grow, adapt (see the shared SEFT-SPEC.md).

Every position is a flat index into the row-major [out, in] weight. A layer's topology is its ``k`` slot
positions ``indices`` (where the trainable delta lives) and its ``active`` mask (where the merged weight may
be non-zero). The functions here are plain tensor code, one layer at a time, so each rule is tested on
hand-built tensors; :mod:`seftkit.repair.seft` drives them across a model.

Statistics stay O(k) in memory: during the accumulation window, the first backward pass fixes a set of
candidate positions (:func:`top_positions` / :func:`bottom_positions` on the transient dense gradient) and
later passes only add to their scores (:class:`Candidates`), as SpIEL does.

Ties are always broken by position (lower flat index first), so the same statistics give the same topology.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from seftkit.repair.delta import gather_flat

CANDIDATE_FACTOR = 2
CANDIDATE_MARGIN = 16


def drop_fraction(t: int, total: int, p0: float, schedule: str) -> float:
    """Fraction of slots replaced at step ``t`` of ``total``: cosine p0*(1+cos(pi*t/T))/2, linear p0*(1-t/T)
    or constant p0 (annealing lets the topology settle as training converges)."""
    progress = min(max(t / total, 0.0), 1.0) if total > 0 else 1.0
    if schedule == "cosine":
        return p0 * (1.0 + math.cos(math.pi * progress)) / 2.0
    if schedule == "linear":
        return p0 * (1.0 - progress)
    if schedule == "constant":
        return p0
    raise ValueError(f"unknown drop schedule {schedule!r}")


def candidate_count(n: int, available: int) -> int:
    """How many positions to track for ``n`` picks: twice as many plus a margin, so the ranking can still
    change over the window and the picks that later steps exclude (adapt) never run out."""
    return min(available, CANDIDATE_FACTOR * n + CANDIDATE_MARGIN)


def _sorted_order(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.argsort(scores, descending=descending, stable=True)


def smallest_slots(magnitudes: torch.Tensor, n: int) -> torch.Tensor:
    """Slot numbers of the ``n`` smallest ``magnitudes`` (|d|), ties by slot number: the DROP rule."""
    return _sorted_order(magnitudes, descending=False)[:n]


def top_positions(scores: torch.Tensor, count: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted flat positions of the ``count`` largest ``scores`` among ``eligible`` ones (bool, same shape); of
    equal scores at the cut, the lower positions."""
    return _extreme_positions(scores, count, eligible, largest=True)


def bottom_positions(scores: torch.Tensor, count: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted flat positions of the ``count`` smallest ``scores`` among ``eligible`` ones (bool, same shape)."""
    return _extreme_positions(scores, count, eligible, largest=False)


def _extreme_positions(
    scores: torch.Tensor, count: int, eligible: torch.Tensor | None, largest: bool
) -> torch.Tensor:
    flat = scores.reshape(-1).float()
    if eligible is not None:
        eligible = eligible.reshape(-1)
        flat = flat.masked_fill(~eligible, -math.inf if largest else math.inf)
        count = min(count, int(eligible.sum()))
    count = min(count, flat.numel())
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=scores.device)
    return torch.sort(_extreme_indices(flat, count, largest)).values


SAMPLE_STRIDE = 64
"""Threshold sampling (:func:`_extreme_indices`) looks at every 64th score."""


def _extreme_indices(flat: torch.Tensor, count: int, largest: bool) -> torch.Tensor:
    """Indices of the ``count`` largest (smallest) entries of ``flat``, unordered; equal scores at the cut go to
    the lower indices, so the picks are the same on every device (``torch.topk`` leaves ties to its kernel).

    ``torch.topk`` of ~17k out of ~900k scores takes ~10 ms on one CPU core, and SEFT runs three per layer at
    every topology update. A strided sample gives a threshold that at least ``count`` scores pass (about 1.25
    times as many); a vectorised comparison collects them in index order and a stable sort of that short list
    takes the best: ~5 ms. Large counts, small tensors and an unlucky sample (fewer than ``count`` pass) take the
    topk's cut instead, then the ties at it by index.
    """
    n = flat.numel()
    if n >= SAMPLE_STRIDE * 1024 and 4 * count <= n:
        sample = flat[::SAMPLE_STRIDE]
        picks = min(sample.numel(), count * 5 // (4 * SAMPLE_STRIDE) + 16)
        edge = torch.topk(sample, picks, largest=largest, sorted=False).values
        passing = torch.nonzero(flat >= edge.min() if largest else flat <= edge.max()).flatten()
        if passing.numel() >= count:  # (NaN scores never pass: they are left to the path below)
            order = torch.sort(flat[passing], descending=largest, stable=True).indices[:count]
            return passing[order]
    top = torch.topk(flat, count, largest=largest, sorted=False)
    cut = top.values.min() if largest else top.values.max()
    beyond = torch.nonzero(flat > cut if largest else flat < cut).flatten()
    at_cut = torch.nonzero(flat == cut).flatten()[: count - beyond.numel()]
    picks = torch.cat([beyond, at_cut])
    return picks if picks.numel() == count else top.indices  # a NaN score defeats the comparisons


@dataclass
class Candidates:
    """Positions fixed at the first pass of a window, and their scores summed over the window's passes."""

    positions: torch.Tensor  # int64, sorted ascending, unique
    scores: torch.Tensor  # fp32, same length

    @classmethod
    def at(cls, positions: torch.Tensor) -> Candidates:
        return cls(positions, torch.zeros(positions.numel(), dtype=torch.float32, device=positions.device))

    def add(self, dense: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Add ``|dense * scale|`` gathered at the candidate positions (``dense``/``scale`` shaped [out, in])."""
        gathered = dense.reshape(-1)[self.positions].float()
        if scale is not None:
            gathered = gathered * scale.reshape(-1)[self.positions].float()
        self.scores += gathered.abs()

    def ranked(self, descending: bool = True) -> torch.Tensor:
        """Positions by score (largest first unless ``descending=False``), ties by position."""
        return self.positions[_sorted_order(self.scores, descending)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"positions": self.positions, "scores": self.scores}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Candidates:
        return cls(state["positions"], state["scores"])


def is_in(positions: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """``torch.isin`` for non-negative positions, through a marker array as long as the largest position:
    ~0.3 ms where isin's sorting takes ~4 ms for SEFT's ~30k candidates against ~17k slots."""
    if not positions.numel() or not members.numel():
        return torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
    marker = torch.zeros(int(torch.maximum(positions.max(), members.max())) + 1, dtype=torch.bool,
                         device=positions.device)
    marker[members] = True
    return marker[positions]


def first_not_in(pool: torch.Tensor, excluded: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """The first ``count`` (default: all) entries of ``pool``, in order, that are not in ``excluded``."""
    return pool[~is_in(pool, excluded)][:count]


@dataclass
class EvolutionStep:
    """What one boundary changed in a layer; ``repurposed`` slots need zero values and fresh optimizer state."""

    repurposed: torch.Tensor  # slot numbers, sorted
    removed: torch.Tensor  # positions taken out of the active set (their base weight must become 0)
    dropped: int
    grown: int
    revived: int = 0  # grown positions that were outside the active set
    emptied: int = 0  # removed because the drop left them at exactly 0 (a revived weight whose delta was dropped)

    @property
    def removed_by_sensitivity(self) -> int:
        return int(self.removed.numel()) - self.emptied


def evolve_layer(
    indices: torch.Tensor,
    magnitudes: torch.Tensor,
    active: torch.Tensor,
    grow: Candidates,
    n: int,
    sensitivity: Candidates | None = None,
    base_weight: torch.Tensor | None = None,
) -> EvolutionStep:
    """One topology update of one layer, in place on ``indices`` (int64 slot positions) and ``active`` (flat).

    1. DROP the ``n`` slots with the smallest ``magnitudes`` (|d|).
    2. GROW them at the ``n`` best ``grow`` candidates (largest accumulated |dW|; the candidates are non-slot
       positions, chosen inside ``active`` unless reviving). Should the candidates run out (tiny layers), the
       dropped positions themselves are reused, so ``|I| = k`` always holds.
    3. ADAPT (only with ``sensitivity``): the r grown positions outside ``active`` join it and r active
       positions leave it, those of smallest sensitivity |T * g|, never one grown in this step. T is taken
       after the drop: dropped positions where ``base_weight`` (the frozen [out, in] weight) is 0 now have
       T = 0 exactly (a revived weight whose delta was dropped), so they go first; then the candidates with
       the smallest sensitivity accumulated over the window. Slots sitting
       on removed positions move to the best remaining candidates inside ``active`` (or, failing those, to
       dropped positions that are still active), so ``|active|`` and ``|I|`` are unchanged.

    With ``n = k`` and magnitudes all equal this is also SEFT's initial slot choice.
    """
    k = indices.numel()
    n = min(n, k)
    dropped_slots = torch.sort(smallest_slots(magnitudes, n)).values
    dropped_positions = indices[dropped_slots].clone()
    ranked = grow.ranked()
    pool = torch.cat([ranked, first_not_in(dropped_positions, ranked, n)])
    survivors = _others(indices, dropped_slots)
    grown = first_not_in(pool, survivors, n)
    indices[dropped_slots] = grown
    step = EvolutionStep(dropped_slots, _empty_like(indices), dropped=n, grown=n)
    if sensitivity is None:
        return step

    revived = grown[~active[grown]]
    step.revived = int(revived.numel())
    if not step.revived:
        return step
    active[revived] = True
    emptied = dropped_positions[:0]
    if base_weight is not None:
        emptied = dropped_positions[gather_flat(base_weight, dropped_positions) == 0]
    removal_order = torch.cat([emptied, first_not_in(sensitivity.ranked(descending=False), emptied)])
    removable = first_not_in(removal_order, grown, step.revived)
    if removable.numel() < step.revived:
        raise RuntimeError("sensitivity candidates ran out; candidate_count must cover the grown positions")
    step.emptied = int(is_in(removable, emptied).sum())
    active[removable] = False
    step.removed = torch.sort(removable).values
    displaced_slots = torch.nonzero(is_in(indices, removable)).flatten()
    if displaced_slots.numel():
        refill_pool = pool[active[pool]]
        refill = first_not_in(refill_pool, indices, displaced_slots.numel())
        if refill.numel() < displaced_slots.numel():
            raise RuntimeError("no active position left to refill displaced slots; k must not exceed |active|")
        indices[displaced_slots] = refill
        step.repurposed = torch.unique(torch.cat([dropped_slots, displaced_slots]))
    return step


def _others(indices: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(indices.numel(), dtype=torch.bool, device=indices.device)
    keep[slots] = False
    return indices[keep]


def _empty_like(indices: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.long, device=indices.device)
