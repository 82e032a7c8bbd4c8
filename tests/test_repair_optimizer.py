"""SlotAdamW: torch's AdamW where nothing restarts; a restarted entry is a fresh Adam parameter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seftkit.repair.optimizer import SlotAdamW

GRADS = [torch.tensor([0.3, -1.2, 0.05, 2.0, -0.7]) * (1 + 0.1 * i) * (-1) ** (i // 3) for i in range(12)]


def _train(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, grads: list[torch.Tensor]) -> None:
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()


def test_matches_torch_adamw_when_nothing_restarts():
    ours, theirs = (torch.nn.Parameter(torch.linspace(-1, 1, 5)) for _ in range(2))
    _train(SlotAdamW([ours], lr=0.01, weight_decay=0.1), ours, GRADS)
    _train(torch.optim.AdamW([theirs], lr=0.01, weight_decay=0.1), theirs, GRADS)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_restarted_entry_moves_like_a_fresh_adam_parameter_and_the_others_keep_going():
    param = torch.nn.Parameter(torch.zeros(5))
    optimizer = SlotAdamW([param], lr=0.01)
    _train(optimizer, param, GRADS[:8])
    kept = param.detach().clone()
    optimizer.restart(param, torch.tensor([1, 3]))
    with torch.no_grad():
        param[[1, 3]] = 0
    _train(optimizer, param, GRADS[8:])

    fresh = torch.nn.Parameter(torch.zeros(5))
    _train(torch.optim.AdamW([fresh], lr=0.01, weight_decay=0.0), fresh, GRADS[8:])
    torch.testing.assert_close(param[[1, 3]], fresh[[1, 3]], rtol=1e-5, atol=1e-7)
    uninterrupted = torch.nn.Parameter(torch.zeros(5))
    _train(torch.optim.AdamW([uninterrupted], lr=0.01, weight_decay=0.0), uninterrupted, GRADS)
    torch.testing.assert_close(param[[0, 2, 4]], uninterrupted[[0, 2, 4]], rtol=1e-5, atol=1e-7)
    assert optimizer.state[param]["age"].tolist() == [12, 4, 12, 4, 12]
    assert not torch.equal(kept[[1, 3]], param[[1, 3]].detach())


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="invalid SlotAdamW"):
        SlotAdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.0)


def test_lr_scale_multiplies_each_elements_step():
    param = nn.Parameter(torch.zeros(3))
    optimizer = SlotAdamW([param], lr=0.1)
    optimizer.set_lr_scale(param, torch.tensor([1.0, 2.0, 0.5]))
    param.grad = torch.tensor([1.0, -1.0, 1.0])
    optimizer.step()  # Adam's first step moves every element by lr (times its scale) against the gradient's sign
    torch.testing.assert_close(param.detach(), torch.tensor([-0.1, 0.2, -0.05]))
