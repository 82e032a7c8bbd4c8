"""Drop, grow and adapt on hand-built tensors: each rule picks exactly what the spec says."""

from __future__ import annotations

import math

import pytest
import torch

from seftkit.repair.evolution import (
    SAMPLE_STRIDE,
    Candidates,
    Rules,
    bottom_positions,
    candidate_count,
    drop_fraction,
    evolve_layer,
    is_in,
    smallest_slots,
    top_positions,
)
from seftkit.sparsity.masks import nm_mask, nm_valid


def _candidates(scores: dict[int, float]) -> Candidates:
    positions = torch.tensor(sorted(scores), dtype=torch.long)
    return Candidates(positions, torch.tensor([scores[int(p)] for p in positions], dtype=torch.float32))


def test_drop_fraction_schedules():
    assert drop_fraction(0, 100, 0.2, "cosine") == pytest.approx(0.2)
    assert drop_fraction(50, 100, 0.2, "cosine") == pytest.approx(0.1)
    assert drop_fraction(25, 100, 0.2, "cosine") == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    assert drop_fraction(100, 100, 0.2, "cosine") == pytest.approx(0.0)
    assert drop_fraction(25, 100, 0.2, "linear") == pytest.approx(0.15)
    assert drop_fraction(70, 100, 0.2, "constant") == 0.2
    with pytest.raises(ValueError, match="unknown drop schedule"):
        drop_fraction(1, 10, 0.2, "step")


def test_candidate_count_is_a_multiple_plus_margin_capped_by_availability():
    assert candidate_count(10, 1000) == 36
    assert candidate_count(10, 1000, factor=5) == 66
    assert candidate_count(10, 20) == 20
    assert candidate_count(0, 5) == 5


def test_drop_picks_smallest_magnitudes_ties_by_slot():
    magnitudes = torch.tensor([0.5, 0.1, 0.3, 0.1, 0.9, 0.3])
    assert smallest_slots(magnitudes, 3).tolist() == [1, 3, 2]
    assert smallest_slots(magnitudes, 0).tolist() == []


def test_top_and_bottom_positions_respect_eligibility():
    scores = torch.tensor([[5.0, 1.0, 4.0], [3.0, 9.0, 2.0]])
    eligible = torch.tensor([[True, True, True], [True, False, True]])
    assert top_positions(scores, 2, eligible).tolist() == [0, 2]  # 9 is not eligible
    assert top_positions(scores, 2).tolist() == [0, 4]
    assert bottom_positions(scores, 2, eligible).tolist() == [1, 5]
    assert top_positions(scores, 10, eligible).tolist() == [0, 1, 2, 3, 5]  # capped by what is eligible


@pytest.mark.parametrize("skewed_sample", [False, True])
def test_large_selections_through_a_sampled_threshold_equal_a_full_topk(skewed_sample):
    """Layer-sized score tensors take the threshold path; a sample that overstates the scores (every sampled
    entry huge) lets too few through, and the full topk must take over. Same positions either way."""
    scores = torch.randn(300_000, generator=torch.Generator().manual_seed(0)).abs()
    if skewed_sample:
        scores[::SAMPLE_STRIDE] += 100.0
    eligible = torch.rand(300_000, generator=torch.Generator().manual_seed(1)) > 0.3
    for count in (6_000, 20_000):
        masked = scores.masked_fill(~eligible, -math.inf)
        expected = torch.sort(torch.topk(masked, count).indices).values
        assert torch.equal(top_positions(scores, count, eligible), expected)
        masked = scores.masked_fill(~eligible, math.inf)
        expected = torch.sort(torch.topk(masked, count, largest=False).indices).values
        assert torch.equal(bottom_positions(scores, count, eligible), expected)


@pytest.mark.parametrize("size", [12, 300_000])
def test_equal_scores_at_the_cut_go_to_the_lower_positions(size):
    scores = torch.zeros(size)
    scores[size // 2] = 5.0  # one clear winner, then a tie of all the zeros
    assert top_positions(scores, 4).tolist() == [0, 1, 2, size // 2]
    assert bottom_positions(-scores, 4).tolist() == [0, 1, 2, size // 2]


def test_a_nan_score_does_not_shrink_a_selection():
    scores = torch.arange(100, dtype=torch.float32)
    scores[50] = math.nan
    assert top_positions(scores, 10).numel() == 10 and bottom_positions(scores, 10).numel() == 10


def test_candidates_accumulate_only_their_positions():
    candidates = Candidates.at(torch.tensor([1, 4]))
    candidates.add(torch.tensor([[1.0, -2.0, 3.0], [4.0, -5.0, 6.0]]))
    candidates.add(torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]), scale=torch.full((2, 3), -3.0))
    assert candidates.scores.tolist() == [5.0, 8.0]
    assert candidates.ranked().tolist() == [4, 1]
    assert candidates.ranked(descending=False).tolist() == [1, 4]


def test_signed_candidates_rank_by_the_magnitude_of_the_summed_gradient():
    candidates = Candidates.at(torch.tensor([0, 1, 2]), signed=True)
    candidates.add(torch.tensor([[3.0, 2.0, -1.5]]))
    candidates.add(torch.tensor([[-3.0, 2.0, -1.5]]))  # position 0 oscillates: |sum| = 0 despite |g| = 3
    assert candidates.scores.tolist() == [0.0, 4.0, -3.0]
    assert candidates.ranked().tolist() == [1, 2, 0]
    restored = Candidates.from_state(candidates.state_dict())
    assert restored.signed and torch.equal(restored.ranked(), candidates.ranked())


def test_grow_takes_the_largest_accumulated_non_slots():
    indices = torch.tensor([0, 3, 5, 9])
    magnitudes = torch.tensor([0.5, 0.01, 0.02, 0.7])  # slots 1 and 2 (positions 3 and 5) are dropped
    active = torch.ones(12, dtype=torch.bool)
    grow = _candidates({1: 0.3, 2: 0.9, 6: 0.5, 7: 0.1})
    step = evolve_layer(indices, magnitudes, active, grow, n=2)
    assert indices.tolist() == [0, 2, 6, 9]  # the two best candidates, in rank order, into slots 1 and 2
    assert step.repurposed.tolist() == [1, 2]
    assert (step.dropped, step.grown, step.revived, step.removed.numel()) == (2, 2, 0, 0)
    assert active.all()


@pytest.mark.parametrize("keep_regrown", [True, False])
def test_grow_reuses_dropped_positions_when_candidates_run_out(keep_regrown):
    indices = torch.tensor([0, 3, 5])
    step = evolve_layer(indices, torch.tensor([0.1, 0.2, 0.3]), torch.ones(8, dtype=torch.bool),
                        _candidates({7: 1.0}), n=2, rules=Rules(keep_regrown=keep_regrown))
    if keep_regrown:  # slot 0's position 0 is picked again: it stays, only slot 1 moves
        assert indices.tolist() == [0, 7, 5]
        assert step.repurposed.tolist() == [1] and step.regrown == 1
    else:
        assert indices.tolist() == [7, 0, 5]
        assert step.repurposed.tolist() == [0, 1] and step.regrown == 0


def test_a_dropped_slot_picked_again_keeps_its_slot_when_keeping_regrown():
    indices = torch.tensor([2, 4, 6])
    grow = _candidates({4: 5.0, 1: 3.0, 6: 0.1})  # 4 is dropped but is the best candidate; 6 is dropped, weak
    step = evolve_layer(indices, torch.tensor([0.9, 0.1, 0.2]), torch.ones(8, dtype=torch.bool), grow, n=2)
    assert indices.tolist() == [2, 4, 1]
    assert step.repurposed.tolist() == [2] and step.regrown == 1


def test_adapt_removes_smallest_sensitivity_never_a_grown_position():
    # 2x4 layer; active = positions 0..3 (row 0), row 1 pruned
    active = torch.tensor([True] * 4 + [False] * 4)
    indices = torch.tensor([0, 1, 3])
    magnitudes = torch.tensor([0.9, 0.1, 0.05])  # slots 1 and 2 (positions 1 and 3) are dropped
    grow = _candidates({5: 3.0, 2: 1.0, 6: 0.5})
    # 5 and 2 are the least sensitive but were grown in this step; 3 is the next smallest
    sensitivity = _candidates({5: 0.0, 2: 0.01, 3: 0.02, 0: 0.5, 1: 0.04})
    step = evolve_layer(indices, magnitudes, active, grow, 2, sensitivity)
    assert indices.tolist() == [0, 5, 2]
    assert step.revived == 1 and step.removed.tolist() == [3]
    assert active.nonzero().flatten().tolist() == [0, 1, 2, 5]


def test_adapt_moves_slots_that_sit_on_removed_positions_inside_the_active_set():
    active = torch.tensor([True] * 4 + [False] * 4)
    indices = torch.tensor([0, 1, 2])
    magnitudes = torch.tensor([0.05, 0.9, 0.8])  # slot 0 dropped
    grow = _candidates({6: 5.0, 3: 1.0, 7: 0.5})
    sensitivity = _candidates({2: 0.001, 1: 0.5, 3: 0.6})  # slot 2's position 2 is the least sensitive
    step = evolve_layer(indices, magnitudes, active, grow, 1, sensitivity)
    assert step.revived == 1 and step.removed.tolist() == [2]
    # slot 0 grew at 6 (revived); slot 2 lost position 2 and refills at the best active candidate, 3
    assert indices.tolist() == [6, 1, 3]
    assert step.repurposed.tolist() == [0, 2]
    assert active.nonzero().flatten().tolist() == [0, 1, 3, 6]
    assert all(active[indices])


def test_adapt_first_removes_revived_weights_whose_delta_was_dropped():
    # position 6 was revived earlier (base weight 0, active); dropping its slot leaves it exactly zero
    active = torch.tensor([True, True, True, False, False, False, True, False])
    base = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    indices = torch.tensor([0, 6])
    grow = _candidates({5: 2.0, 7: 1.0})
    sensitivity = _candidates({1: 0.001, 2: 0.5})  # 1 would go first by sensitivity alone
    step = evolve_layer(indices, torch.tensor([0.9, 0.1]), active, grow, 1, sensitivity, base)
    assert indices.tolist() == [0, 5]
    assert step.revived == 1 and step.emptied == 1 and step.removed_by_sensitivity == 0
    assert step.removed.tolist() == [6]
    assert active.nonzero().flatten().tolist() == [0, 1, 2, 5]


def test_initial_choice_is_the_top_k_then_adapt():
    # n = k with equal magnitudes: every placeholder slot is replaced by the k best candidates
    active = torch.tensor([True, True, True, False, False, True])
    indices = torch.tensor([0, 1])
    grow = _candidates({i: s for i, s in enumerate([0.1, 0.2, 0.3, 0.9, 0.05, 0.8])})
    sensitivity = _candidates({0: 0.3, 1: 0.1, 2: 0.2, 5: 0.0})
    step = evolve_layer(indices, torch.zeros(2), active, grow, 2, sensitivity)
    assert indices.tolist() == [3, 5]
    assert step.revived == 1 and step.removed.tolist() == [1]  # 5 is grown, so 1 goes
    assert int(active.sum()) == 4


def test_a_free_place_is_reclaimed_even_when_growth_revives_nothing():
    # position 6 was revived earlier (base 0, active, slot 1); its slot is dropped and growth only picks inside
    # the active set: the weakest inside pick moves to the best candidate outside it, so 6's place is refilled
    active = torch.tensor([True, True, True, False, False, False, True, False])
    base = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    indices = torch.tensor([0, 6])
    grow = _candidates({1: 2.0, 7: 0.5})
    step = evolve_layer(indices, torch.tensor([0.9, 0.1]), active, grow, 1, _candidates({2: 0.1}), base)
    assert indices.tolist() == [0, 7]
    assert (step.revived, step.emptied, step.removed.tolist()) == (1, 1, [6])
    assert active.nonzero().flatten().tolist() == [0, 1, 2, 7]


def test_a_free_place_without_outside_candidates_is_picked_again():
    active = torch.tensor([True, True, True, False, False, False, True, False])
    base = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    indices = torch.tensor([0, 6])
    step = evolve_layer(indices, torch.tensor([0.9, 0.1]), active, _candidates({1: 2.0}), 1,
                        _candidates({2: 0.1}), base, Rules(keep_regrown=False))
    assert indices.tolist() == [0, 6]  # back on its own place (restarted at 0), which stays active
    assert (step.revived, step.emptied, step.removed.numel()) == (0, 0, 0)
    assert step.repurposed.tolist() == [1]
    assert int(active.sum()) == 4


def test_row_eviction_balances_each_row():
    # 2 rows of 4; row 0 active at 0..2, row 1 at 4..5. Growth revives 7 (row 1): row 1 must give up one
    active = torch.tensor([True, True, True, False, True, True, False, False])
    base = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    indices = torch.tensor([0, 4])
    sensitivity = _candidates({1: 0.01, 5: 0.2, 2: 0.3})  # 1 is least sensitive but sits in row 0
    evolve_layer(indices, torch.tensor([0.9, 0.1]), active, _candidates({7: 3.0}), 1, sensitivity, base,
                 Rules(row_width=4))
    assert indices.tolist() == [0, 7]
    assert active.nonzero().flatten().tolist() == [0, 1, 2, 4, 7]  # 5 left, row counts 3 and 2 kept
    active = torch.tensor([True, True, True, False, True, True, False, False])
    evolve_layer(torch.tensor([0, 4]), torch.tensor([0.9, 0.1]), active, _candidates({7: 3.0}), 1, sensitivity,
                 base)
    assert active.nonzero().flatten().tolist() == [0, 2, 4, 5, 7]  # per matrix: 1 leaves row 0


def test_row_eviction_falls_back_to_the_smallest_weight_of_a_row_without_candidates():
    active = torch.tensor([True, True, True, False, True, True, True, False])
    base = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.5, 5.0, 0.0]])
    indices = torch.tensor([0, 4])
    evolve_layer(indices, torch.tensor([0.9, 0.1]), active, _candidates({7: 3.0}), 1, _candidates({1: 0.01}),
                 base, Rules(row_width=4))
    assert active.nonzero().flatten().tolist() == [0, 1, 2, 4, 6, 7]  # row 1's smallest |W| (5) made room


@pytest.mark.parametrize("rules", [Rules(), Rules(keep_regrown=False), Rules(row_width=16)],
                         ids=["matrix", "restart-regrown", "row"])
@pytest.mark.parametrize("revive", [True, False])
def test_random_rounds_keep_k_slots_the_active_count_and_no_empty_active_place(revive, rules):
    torch.manual_seed(0)
    rows, cols, k = 8, 16, 20
    weight = torch.randn(rows, cols)
    active = nm_mask(weight.abs(), 2, 4).reshape(-1)
    start = active.clone()
    base = weight * active.reshape(rows, cols)  # pruned; adapt zeroes what it removes, as SEFT does
    target = int(active.sum())
    indices = torch.nonzero(active).flatten()[torch.randperm(target)[:k]]
    emptied = 0
    for _ in range(12):
        grad = torch.randn(rows, cols)
        n = 8
        eligible = torch.ones(rows * cols, dtype=torch.bool)
        eligible[indices] = False
        inside = top_positions(grad.abs(), candidate_count(n, target), eligible & active)
        if revive:
            anywhere = top_positions(grad.abs(), candidate_count(n, rows * cols), eligible)
            grow = Candidates.at(torch.unique(torch.cat([anywhere, inside, indices])))
            sensitivity = Candidates.at(bottom_positions((base * grad).abs(), 6, active))
            sensitivity.add(base * grad)
        else:
            grow = Candidates.at(torch.unique(torch.cat([inside, indices])))
            sensitivity = None
        grow.add(grad)
        step = evolve_layer(indices, torch.rand(k), active, grow, n, sensitivity, base, rules)
        base.view(-1)[step.removed] = 0
        emptied += step.emptied
        assert indices.numel() == k and indices.unique().numel() == k
        assert int(active.sum()) == target
        assert active[indices].all()
        # an active position with base 0 is a revived weight: it must hold a slot, or the merge would lose it
        assert is_in(torch.nonzero(active & (base.view(-1) == 0)).flatten(), indices).all()
        if rules.row_width:
            assert torch.equal(active.reshape(rows, cols).sum(1), start.reshape(rows, cols).sum(1))
    if revive:
        assert (active & ~start).any() and emptied > 0
    else:
        assert torch.equal(active, start)
        assert nm_valid(active.reshape(rows, cols).float(), 2, 4)


def test_row_fallback_takes_each_short_rows_smallest_weights_ties_to_the_lower_position():
    from seftkit.repair.evolution import _smallest_in_rows

    base = torch.tensor([[3.0, 1.0, 1.0, 2.0], [5.0, 4.0, 0.5, 6.0], [1.0, 1.0, 1.0, 1.0]])
    active = torch.ones(12, dtype=torch.bool)
    active[2] = False  # row 0's second 1.0 is not active
    picked = _smallest_in_rows(torch.tensor([2, 0, 3]), active, base, excluded=torch.tensor([9]))
    assert sorted(picked.tolist()) == [1, 3, 8, 10, 11]  # row 2: 9 is excluded, the ties go 8, 10, 11
