"""The pruners seftkit knows, by name, with what each one needs and supports.

The CLI's ``--method`` choices, the checks in :func:`seftkit.prune.prune_model` and the quality bench all read
this table, so a new pruner is one entry here plus its own module holding ``pruner(weight [out, in], stats,
pattern) -> keep-mask`` (and, when it looks at activations, an additive input statistic for
:mod:`seftkit.prune.calibrate`). Entries name their functions by import path so that this module, and with it
``seftkit --help``, does not import torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from seftkit.errors import SeftkitError


@dataclass(frozen=True)
class PrunerSpec:
    """One pruner: where its functions live and what it can do.

    ``statistic`` names the additive input statistic (``None``: no calibration data at all). ``updates_weights``
    is True when kept weights change too (SparseGPT's OBS updates), not only the pruned ones.
    """

    name: str
    module: str
    pruner: str
    statistic: str | None = None
    supports_nm: bool = True
    updates_weights: bool = False
    summary: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.statistic is not None

    def load_pruner(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), self.pruner)

    def load_statistic(self) -> Callable[..., Any] | None:
        return getattr(importlib.import_module(self.module), self.statistic) if self.statistic else None


PRUNERS: dict[str, PrunerSpec] = {
    spec.name: spec
    for spec in (
        PrunerSpec("magnitude", "seftkit.prune.magnitude", "magnitude_mask",
                   summary="smallest |W| per matrix (no calibration)"),
        PrunerSpec("wanda", "seftkit.prune.wanda", "wanda_mask", statistic="input_sq_norms",
                   summary="|W| * ||X|| per output row"),
        PrunerSpec("sparsegpt", "seftkit.prune.sparsegpt", "sparsegpt_prune", statistic="input_gram",
                   updates_weights=True, summary="OBS with weight updates from the layer Hessian"),
    )
}


def get_pruner(name: str) -> PrunerSpec:
    if name not in PRUNERS:
        raise SeftkitError(f"unknown pruning method {name!r}: choose from {', '.join(PRUNERS)}")
    return PRUNERS[name]
