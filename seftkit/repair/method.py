"""The interface every repair method implements, so the training loop never branches on method names.

Life cycle driven by ``seftkit.repair.trainer``:
  attach(model, targets) -> make_optimizer(...) -> [init_passes() forward/backward passes, then finish_init()] ->
  for each step: before_backward(step) before every micro-batch backward, optimizer.step(),
  after_optimizer_step(step, optimizer) -> merge() at the end (plain HF model, target sparsity exact).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from seftkit.repair.config import RepairConfig


class RepairMethod(ABC):
    name: ClassVar[str]
    # True when the optimizer trains the model's own weights, which then load in fp32 whatever --dtype says
    # (Adam steps of ~lr are below bf16's resolution); the output is still written in the chosen dtype.
    trains_base_weights: ClassVar[bool] = False

    def __init__(self, config: RepairConfig) -> None:
        self.config = config

    @abstractmethod
    def attach(self, model: nn.Module, targets: dict[str, nn.Module]) -> None:
        """Wrap or adapt the target linears (full module names -> modules) and freeze everything else."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains (its state is what the method costs in memory)."""

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def make_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW over :meth:`trainable_parameters` (a method whose entries restart mid-run brings its own)."""
        return torch.optim.AdamW(self.trainable_parameters(), lr=lr, weight_decay=weight_decay)

    def init_passes(self) -> int:
        """Forward/backward passes (without optimizer steps) the method needs before training starts."""
        return 0

    def finish_init(self) -> None:
        """Called after the init passes (e.g. pick SEFT's initial slots from accumulated gradients)."""

    def before_backward(self, step: int) -> None:
        """Called before each micro-batch backward of ``step`` (0-based), e.g. to accumulate growth candidates."""

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """Called after ``optimizer.step()`` of ``step``; topology changes happen here. Returns an event record
        for the report (or None); must reset optimizer state of any trainable entry it repurposes."""
        return None

    @abstractmethod
    def merge(self) -> None:
        """Fold the learned update into the base weights in place, restore plain modules, keep sparsity exact."""

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the trainable parameters and optimizer needed to resume (indices, masks...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output after :meth:`attach`."""

    def summary(self) -> dict[str, Any]:
        """Method-specific numbers for the report (e.g. revived weights)."""
        return {}
