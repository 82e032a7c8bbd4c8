"""Every repair method seftkit knows, in one table.

The CLI's ``--method`` choices and help, :class:`~seftkit.repair.config.RepairConfig`'s checks, the FSDP refusals
and the benches all read this table, so a new method is one entry here plus its own module (a
:class:`~seftkit.repair.method.RepairMethod` subclass, imported only when it is built).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from seftkit.errors import SeftkitError

if TYPE_CHECKING:
    from seftkit.repair.config import RepairConfig
    from seftkit.repair.method import RepairMethod

# RepairConfig fields that only topology evolution reads; the second group only matters when pruned weights revive.
EVOLUTION_OPTIONS = ("update_interval", "accumulation_steps", "drop_rate", "drop_schedule", "init", "keep_regrown",
                     "grow_score")
REVIVAL_OPTIONS = ("eviction", "revived_lr_scale")


@dataclass(frozen=True)
class RepairMethodEntry:
    name: str
    summary: str  # one line for --help and docs
    factory: str  # "module:callable" that builds the method from a RepairConfig
    revives: bool  # pruned positions may become non-zero (the layer's nnz is still kept)
    baseline: bool  # a comparison point for SEFT (the bench reuses its runs across changes to SEFT's code)
    options: tuple[str, ...] = ()  # method-specific RepairConfig fields it reads
    fsdp_refusal: str | None = None  # why it cannot run with --strategy fsdp; None when it can

    def build(self, config: RepairConfig) -> RepairMethod:
        module, attr = self.factory.split(":")
        make: Callable[[RepairConfig], RepairMethod] = getattr(importlib.import_module(module), attr)
        return make(config)


REPAIR_METHODS: dict[str, RepairMethodEntry] = {entry.name: entry for entry in (
    RepairMethodEntry("seft", "sparse delta whose topology evolves; grows where gradients are large, pruned "
                      "positions included", "seftkit.repair.seft:SeftMethod", revives=True, baseline=False,
                      options=EVOLUTION_OPTIONS + REVIVAL_OPTIONS),
    RepairMethodEntry("seft-no-revive", "SEFT with growth confined to the input's non-zeros",
                      "seftkit.repair.seft:no_revive", revives=False, baseline=False, options=EVOLUTION_OPTIONS),
    RepairMethodEntry("lora-prune", "dense LoRA, merged, then re-pruned to each layer's nnz (the paper's LoRA*)",
                      "seftkit.repair.baselines:LoraPrune", revives=True, baseline=True,
                      fsdp_refusal="peft's merge and the Wanda re-pruning need unsharded weights"),
    RepairMethodEntry("masked-lora", "LoRA whose update is masked to the support (SQFT's SparsePEFT)",
                      "seftkit.repair.baselines:MaskedLora", revives=False, baseline=True),
    RepairMethodEntry("static", "every non-zero weight trains (the memory ceiling)",
                      "seftkit.repair.baselines:StaticSparse", revives=False, baseline=True,
                      fsdp_refusal="it trains whole weight matrices (and keeps optimizer state for them)"),
)}


def repair_method(name: str) -> RepairMethodEntry:
    """The entry called ``name``; an unknown name is bad input listing the choices."""
    if name not in REPAIR_METHODS:
        raise SeftkitError(f"unknown repair method {name!r}; choose from: {', '.join(REPAIR_METHODS)}")
    return REPAIR_METHODS[name]


def build_method(config: RepairConfig) -> RepairMethod:
    return repair_method(config.method).build(config)


def fsdp_methods() -> list[str]:
    return [name for name, entry in REPAIR_METHODS.items() if entry.fsdp_refusal is None]


def baseline_methods() -> list[str]:
    return [name for name, entry in REPAIR_METHODS.items() if entry.baseline]
