"""SEFT topology evolution for one layer: drop, grow, adapt (docs/seft.md).

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
SIGNED_CANDIDATE_FACTOR = 5  # a signed sum reorders more over the window than a sum of magnitudes
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


def candidate_count(n: int, available: int, factor: int = CANDIDATE_FACTOR) -> int:
    """How many positions to track for ``n`` picks: ``factor`` times as many plus a margin, so the ranking can
    still change over the window (the first pass alone fixes the candidates) and the picks that later steps
    exclude (adapt) never run out."""
    return min(available, factor * n + CANDIDATE_MARGIN)


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
    """Positions fixed at the first pass of a window, and their scores summed over the window's passes.

    ``signed`` candidates sum the gradient itself and rank by the magnitude of the sum (SpIEL's |sum of g|:
    a position whose gradient keeps its sign beats one that oscillates); otherwise they sum magnitudes."""

    positions: torch.Tensor  # int64, sorted ascending, unique
    scores: torch.Tensor  # fp32, same length
    signed: bool = False

    @classmethod
    def at(cls, positions: torch.Tensor, signed: bool = False) -> Candidates:
        scores = torch.zeros(positions.numel(), dtype=torch.float32, device=positions.device)
        return cls(positions, scores, signed)

    def add(self, dense: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Add ``dense * scale`` (its magnitude unless signed) gathered at the candidate positions (``dense`` and
        ``scale`` shaped [out, in])."""
        gathered = dense.reshape(-1)[self.positions].float()
        if scale is not None:
            gathered = gathered * scale.reshape(-1)[self.positions].float()
        self.scores += gathered if self.signed else gathered.abs()

    def ranked(self, descending: bool = True) -> torch.Tensor:
        """Positions by score magnitude (largest first unless ``descending=False``), ties by position."""
        return self.positions[_sorted_order(self.scores.abs(), descending)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"positions": self.positions, "scores": self.scores,
                "signed": torch.tensor(self.signed)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Candidates:
        return cls(state["positions"], state["scores"], bool(state.get("signed", False)))


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
    regrown: int = 0  # dropped slots that growth picked again: they keep their value and optimizer state
    revived: int = 0  # grown positions that were outside the active set
    emptied: int = 0  # active positions the drop left at exactly 0 (revived weights whose delta was dropped)

    @property
    def removed_by_sensitivity(self) -> int:
        return int(self.removed.numel()) - self.emptied


@dataclass(frozen=True)
class Rules:
    """How a topology update chooses (docs/seft.md; each is a RepairConfig option).

    ``keep_regrown``: a dropped slot that growth picks again keeps its value and optimizer state (SpIEL), instead
    of restarting at 0. ``row_width``: adapt balances revivals and evictions within each output row of this
    width (every row keeps its nnz, as Wanda prunes); None balances over the whole matrix.
    """

    keep_regrown: bool = True
    row_width: int | None = None


def evolve_layer(
    indices: torch.Tensor,
    magnitudes: torch.Tensor,
    active: torch.Tensor,
    grow: Candidates,
    n: int,
    sensitivity: Candidates | None = None,
    base_weight: torch.Tensor | None = None,
    rules: Rules = Rules(),
) -> EvolutionStep:
    """One topology update of one layer, in place on ``indices`` (int64 slot positions) and ``active`` (flat).

    1. DROP the ``n`` slots with the smallest ``magnitudes`` (|d|).
    2. GROW ``n`` slots at the best ``grow`` candidates that are not surviving slots (largest accumulated
       gradient; inside ``active`` unless reviving). Should the candidates run out (tiny layers), the dropped
       positions themselves are reused, so ``|I| = k`` always holds.
    3. ADAPT (only with ``sensitivity``, i.e. when reviving): a dropped position whose base weight is 0 and
       that growth did not pick again now holds nothing (a revived weight whose delta was dropped): it is
       *emptied* and leaves ``active``, a free place. Revivals (grown positions outside ``active``) join it:
       first into the free places, then each further one evicts the active position of smallest sensitivity
       |T * g| (never one grown in this step). Should the free places outnumber the revivals, the weakest
       grown picks inside ``active`` move to the best candidates outside it (failing those, back onto the free
       places), so every layer keeps exactly its nnz and no active position is left holding nothing. With
       ``rules.row_width`` all of this balances within each output row. Slots sitting on evicted positions
       move to the best remaining candidates inside ``active``.

    With ``n = k`` and magnitudes all equal this is also SEFT's initial slot choice.
    """
    k = indices.numel()
    n = min(n, k)
    dropped_slots = torch.sort(smallest_slots(magnitudes, n)).values
    dropped_positions = indices[dropped_slots].clone()
    ranked = grow.ranked()
    pool = torch.cat([ranked, first_not_in(dropped_positions, ranked)])
    survivors = _others(indices, dropped_slots)
    picks = first_not_in(pool, survivors, n)
    step = EvolutionStep(dropped_slots, _empty_like(indices), dropped=n, grown=n)
    if sensitivity is not None:
        empty_dropped = dropped_positions[:0]
        if base_weight is not None:
            empty_dropped = dropped_positions[gather_flat(base_weight, dropped_positions) == 0]
        picks = _fill_free_places(picks, pool, survivors, empty_dropped, active, rules.row_width)
        free = first_not_in(empty_dropped, picks)
        revived = picks[~active[picks]]
        active[free] = False
        active[revived] = True
        evicted = _evict(revived, free, picks, survivors, active, sensitivity, base_weight, rules.row_width)
        active[evicted] = False
        unbalanced = _count_groups(revived, rules.row_width, active) - _count_groups(free, rules.row_width, active) \
            - _count_groups(evicted, rules.row_width, active)
        if int(unbalanced.sum()):  # rows too full of picks to give up enough: their weakest revivals are undone
            picks, revived = _undo_revivals(unbalanced, picks, revived, survivors, pool, active, rules.row_width)
        step.revived, step.emptied = int(revived.numel()), int(free.numel())
        step.removed = torch.sort(torch.cat([free, evicted])).values
    _assign(indices, dropped_slots, dropped_positions, picks, rules.keep_regrown, step)
    if step.removed.numel():
        displaced_slots = torch.nonzero(is_in(indices, step.removed)).flatten()
        if displaced_slots.numel():
            refill = first_not_in(pool[active[pool]], indices, displaced_slots.numel())
            if refill.numel() < displaced_slots.numel():
                raise RuntimeError("no active position left to refill displaced slots; k must not exceed |active|")
            indices[displaced_slots] = refill
            step.repurposed = torch.unique(torch.cat([step.repurposed, displaced_slots]))
    return step


def _assign(indices: torch.Tensor, dropped_slots: torch.Tensor, dropped_positions: torch.Tensor,
            picks: torch.Tensor, keep_regrown: bool, step: EvolutionStep) -> None:
    """Put the ``picks`` into the dropped slots: with ``keep_regrown`` a slot whose position was picked again
    stays (value and optimizer state kept) and the others take the new picks in rank order."""
    if keep_regrown:
        regrown = is_in(dropped_positions, picks)
        moving = dropped_slots[~regrown]
        indices[moving] = first_not_in(picks, dropped_positions)
        step.repurposed, step.regrown = moving, int(regrown.sum())
    else:
        indices[dropped_slots] = picks
        step.repurposed = dropped_slots


def _groups(positions: torch.Tensor, row_width: int | None) -> torch.Tensor:
    """The balancing group of each flat position: its row, or 0 for the whole matrix."""
    return positions // row_width if row_width else torch.zeros_like(positions)


def _count(groups: torch.Tensor, size: int) -> torch.Tensor:
    return torch.bincount(groups, minlength=size)[:size] if groups.numel() else groups.new_zeros(size)


def _count_groups(positions: torch.Tensor, row_width: int | None, active: torch.Tensor) -> torch.Tensor:
    """How many of ``positions`` fall in each balancing group of a layer with the flat mask ``active``."""
    return _count(_groups(positions, row_width), int(active.numel() // row_width) if row_width else 1)


def _undo_revivals(excess: torch.Tensor, picks: torch.Tensor, revived: torch.Tensor, survivors: torch.Tensor,
                   pool: torch.Tensor, active: torch.Tensor, row_width: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Take the ``excess[g]`` weakest revivals of each group g back out of the active set; their picks move to
    active positions that hold no slot (best candidates first), which leaves every group's count unchanged."""
    weakest_first = revived.flip(0)
    undone = weakest_first[_within_quota(weakest_first, row_width, excess)]
    active[undone] = False
    taken = torch.cat([picks, survivors])
    reservoir = first_not_in(pool[active[pool]], taken)
    if reservoir.numel() < undone.numel():
        reservoir = torch.cat([reservoir, first_not_in(torch.nonzero(active).flatten(), torch.cat([taken, reservoir]))])
    picks = picks.clone()
    picks[is_in(picks, undone)] = reservoir[: undone.numel()]
    return picks, revived[~is_in(revived, undone)]


def _within_quota(positions: torch.Tensor, row_width: int | None, quota: torch.Tensor) -> torch.Tensor:
    """Mask of the ``positions`` (in priority order) that are among the first ``quota[g]`` of their group g."""
    if not positions.numel():
        return torch.zeros(0, dtype=torch.bool, device=positions.device)
    if not row_width:  # one group: the first quota[0]
        return torch.arange(positions.numel(), device=positions.device) < quota[0]
    groups = _groups(positions, row_width)
    order = torch.argsort(groups, stable=True)
    ordered = groups[order]
    first = torch.searchsorted(ordered, ordered)  # index of the first member of each one's group
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - first
    return rank < quota[groups]


def _fill_free_places(picks: torch.Tensor, pool: torch.Tensor, survivors: torch.Tensor, empty_dropped: torch.Tensor,
                      active: torch.Tensor, row_width: int | None) -> torch.Tensor:
    """Make the revivals among ``picks`` cover the free places of every group (see :func:`evolve_layer`)."""
    free = first_not_in(empty_dropped, picks)
    if not free.numel():
        return picks
    need = _count_groups(free, row_width, active) - _count_groups(picks[~active[picks]], row_width, active)
    deficit = need.clamp(min=0)
    if not int(deficit.sum()):
        return picks
    # what fills a deficit: the best unpicked candidates outside the active set, then the free places themselves
    outside = first_not_in(pool[~active[pool]], torch.cat([picks, survivors]))
    fill_pool = torch.cat([outside, free])
    fills = fill_pool[_within_quota(fill_pool, row_width, deficit)]
    # what gives way, weakest first: picks inside the active set that are not free places picked again, then
    # revivals of groups that have more than they need
    backwards = picks.flip(0)
    inside = backwards[active[backwards] & ~is_in(backwards, empty_dropped)]
    outside_picks = backwards[~active[backwards]]
    spare = outside_picks[_within_quota(outside_picks, row_width, (-need).clamp(min=0))]
    givers = torch.cat([inside, spare])[: fills.numel()]
    if givers.numel() < fills.numel():
        raise RuntimeError("too few grown picks to fill the free places; this is a bug, please report it")
    picks = picks.clone()
    picks[is_in(picks, givers)] = fills[: givers.numel()]
    return picks


def _evict(revived: torch.Tensor, free: torch.Tensor, picks: torch.Tensor, survivors: torch.Tensor,
           active: torch.Tensor, sensitivity: Candidates, base_weight: torch.Tensor | None,
           row_width: int | None) -> torch.Tensor:
    """The active positions to remove so that revivals beyond the free places are balanced, group by group:
    smallest accumulated sensitivity first, never a position grown in this step."""
    quota = (_count_groups(revived, row_width, active) - _count_groups(free, row_width, active)).clamp(min=0)
    if not int(quota.sum()):
        return _empty_like(picks)
    order = sensitivity.ranked(descending=False)
    order = first_not_in(order[active[order]], picks)
    evicted = order[_within_quota(order, row_width, quota)]
    short = quota - _count_groups(evicted, row_width, active)
    if int(short.sum()):  # a row whose candidates ran out gives up its smallest |W| that holds no slot
        if base_weight is None or row_width is None:
            raise RuntimeError("sensitivity candidates ran out; candidate_count must cover the grown positions")
        protected = torch.cat([picks, survivors, evicted])
        evicted = torch.cat([evicted, _smallest_in_rows(short, active, base_weight, protected)])
    return evicted


def _smallest_in_rows(short: torch.Tensor, active: torch.Tensor, base_weight: torch.Tensor,
                      excluded: torch.Tensor) -> torch.Tensor:
    """For each row r with ``short[r] > 0``: its ``short[r]`` active positions of smallest |W| not ``excluded``
    (ties to the lower position)."""
    width = base_weight.shape[1]
    rows = torch.nonzero(short).flatten()
    eligible = active.view(-1, width)[rows]
    eligible &= ~is_in(torch.arange(active.numel(), device=active.device), excluded).view(-1, width)[rows]
    scores = base_weight[rows].abs().float().masked_fill_(~eligible, math.inf)
    order = torch.sort(scores, dim=1, stable=True).indices  # [rows, width], ascending
    rank = torch.arange(width, device=active.device)
    take = (rank < short[rows, None]) & (rank < eligible.sum(1, keepdim=True))
    return (order + rows[:, None] * width)[take]


def _others(indices: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(indices.numel(), dtype=torch.bool, device=indices.device)
    keep[slots] = False
    return indices[keep]


def _empty_like(indices: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.long, device=indices.device)
