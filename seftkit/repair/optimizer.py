"""AdamW with a step count per element, so SEFT can restart single slots without disturbing the others.

torch's AdamW keeps one ``step`` per tensor for its bias correction. When SEFT repurposes a slot at step ``t``
and zeroes that slot's moments, the shared correction still divides its second moment by ``1 - beta2**t``
(not by ``1 - beta2**age``), so a young slot moves up to ~1.8x the learning rate per step for tens of steps
after a late topology update. :class:`SlotAdamW` counts an ``age`` per element, as SpIEL's optimizer does:
a restarted slot is exactly a fresh Adam parameter, and for the rest the update is torch's AdamW formula.

SpIEL's warm-started moments for new slots are not offered (they repaired worse: docs/seft.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class SlotAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter) with per-element bias correction; see the module."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr <= 0 or not all(0.0 <= beta < 1.0 for beta in betas) or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid SlotAdamW settings lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def _state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[param]
        if not state:
            for key in ("exp_avg", "exp_avg_sq", "age"):
                state[key] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state(param)
                grad = param.grad.float()
                age = state["age"].add_(1)
                scale = state.get("lr_scale")
                if decay:  # decoupled decay follows each element's learning rate too
                    param.mul_(1 - lr * decay * (scale if scale is not None else 1.0))
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                # torch's AdamW formula, with the bias corrections per element
                denom = state["exp_avg_sq"].sqrt().div_((1 - torch.pow(beta2, age)).sqrt_()).add_(eps)
                step = state["exp_avg"] / (1 - torch.pow(beta1, age))
                if scale is not None:
                    step.mul_(scale)
                param.addcdiv_(step, denom, value=-lr)
        return loss

    @torch.no_grad()
    def set_lr_scale(self, param: torch.Tensor, scale: torch.Tensor) -> None:
        """Multiply the learning rate of each element of ``param`` by ``scale`` (same shape) from now on."""
        self._state(param)["lr_scale"] = scale.to(device=param.device, dtype=torch.float32)

    @torch.no_grad()
    def restart(self, param: torch.Tensor, entries: torch.Tensor) -> None:
        """Make ``entries`` of ``param`` fresh Adam parameters: zero moments and age."""
        state = self._state(param)
        for key in ("exp_avg", "exp_avg_sq", "age"):
            state[key][entries] = 0
