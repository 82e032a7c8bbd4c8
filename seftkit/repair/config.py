"""Every repair knob in one dataclass: the CLI, the Python API, checkpoints and reports share it.

The dataclass owns its validation (:meth:`RepairConfig.validate`, run on construction): a setting that cannot
train fails here, with the option to fix, before any model loads.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

from seftkit.data import DEFAULT_TRAIN_TEXT, parse_task_data, training_tasks
from seftkit.errors import SeftkitError
from seftkit.repair.registry import REPAIR_METHODS, REVIVAL_OPTIONS, fsdp_methods, repair_method
from seftkit.sparsity.pattern import parse_nm

STRATEGIES = ("ddp", "fsdp")
DEFAULT_LORA_RANK_EQUIVALENT = 8
DROP_SCHEDULES = ("cosine", "linear", "constant")
INIT_MODES = ("grad-active", "grad", "random")
EVICTIONS = ("matrix", "row")
GROW_SCORES = ("sum-abs", "abs-sum")


@dataclass
class RepairConfig:
    method: str = "seft"
    # data and optimisation
    data: str = DEFAULT_TRAIN_TEXT
    max_per_task: int | None = None  # task data: a seeded sample of at most this many questions per task
    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    seqlen: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = None  # clip the trainable parameters' global gradient norm (None: never)
    seed: int = 0
    # trainable budget: k_l = delta_density * numel, or r * (in + out) (a rank-r LoRA's parameter count);
    # with neither given the budget is rank 8
    delta_density: float | None = None
    lora_rank_equivalent: int | None = None
    # SEFT topology evolution (docs/seft.md)
    update_interval: int = 20
    accumulation_steps: int = 5
    drop_rate: float = 0.2
    drop_schedule: str = "cosine"
    # Initial slots: "grad-active" the largest accumulated |dW| inside the active set (pruned weights come back
    # only through the drop-rate-bounded updates); "grad" the same anywhere, then adapt (about half the slots
    # land on pruned positions at once);
    # "random" seeded random positions inside the active set.
    init: str = "grad-active"
    revive: bool = True  # False for seft-no-revive: growth confined to the active set
    # A dropped slot that growth picks again keeps its value and Adam state (SpIEL); False restarts it at 0.
    keep_regrown: bool = True
    # Eviction balances revivals "matrix"-wide or per output "row" (every row keeps its nnz, as Wanda prunes).
    eviction: str = "matrix"
    # Growth ranks candidates by "sum-abs" (sum over the window of |g|) or "abs-sum" (|sum of g|, SpIEL).
    grow_score: str = "sum-abs"
    # Learning-rate multiplier for slots on revived (base-0) positions: they start from 0, kept weights do not.
    revived_lr_scale: float = 1.0
    # target sparsity pattern: None keeps each layer's current nnz; nm keeps N:M
    nm: str | None = None
    include: str | None = None
    exclude: str | None = None
    # evaluation before/after
    eval_ppl: str | None = None
    eval_tasks: list[str] = field(default_factory=list)
    eval_limit: int | None = None
    eval_windows: int | None = None  # perplexity on the first N windows of --eval-ppl (None: all)
    # runtime
    device: str = "auto"
    dtype: str = "auto"  # weights in memory and in the output; auto: the input checkpoint's dtype
    gradient_checkpointing: bool = False
    checkpoint_every: int | None = None
    # how processes share the model under torchrun: "ddp" replicates it, "fsdp" shards the frozen weights
    # (None: fsdp under an accelerate FSDP launch, else ddp; see seftkit.repair.sharding)
    strategy: str | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.delta_density is None and self.lora_rank_equivalent is None:
            self.lora_rank_equivalent = DEFAULT_LORA_RANK_EQUIVALENT
        self.validate()

    def validate(self) -> None:
        """Refuse settings that cannot train (:class:`SeftkitError` naming the option); run on construction."""
        entry = repair_method(self.method)
        at_least_one = {"--steps": self.steps, "--batch-size": self.batch_size, "--grad-accum": self.grad_accum,
                        "--eval-windows": self.eval_windows, "--checkpoint-every": self.checkpoint_every,
                        "--update-interval": self.update_interval, "--accumulation-steps": self.accumulation_steps,
                        "--max-per-task": self.max_per_task, "log_every": self.log_every}
        for flag, value in at_least_one.items():
            if value is not None and value < 1:
                raise SeftkitError(f"{flag} must be at least 1, got {value}")
        if self.seqlen < 2:
            raise SeftkitError(f"--seqlen must be at least 2, got {self.seqlen}")
        if self.warmup_steps < 0:
            raise SeftkitError(f"--warmup-steps must be at least 0, got {self.warmup_steps}")
        _check_positive("--lr", self.lr)
        _check_positive("--revived-lr-scale", self.revived_lr_scale)
        if self.max_grad_norm is not None:
            _check_positive("--max-grad-norm", self.max_grad_norm)
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise SeftkitError(f"--weight-decay must be a number >= 0, got {self.weight_decay}")
        self._check_budget()
        if not 0.0 <= self.drop_rate <= 1.0:
            raise SeftkitError(f"--drop-rate must be in [0, 1], got {self.drop_rate}")
        for flag, value, choices in (("--drop-schedule", self.drop_schedule, DROP_SCHEDULES),
                                     ("--init", self.init, INIT_MODES), ("--eviction", self.eviction, EVICTIONS),
                                     ("--grow-score", self.grow_score, GROW_SCORES)):
            if value not in choices:
                raise SeftkitError(f"unknown {flag} {value!r}: use {', '.join(choices)}")
        self._check_data()
        if self.eval_windows is not None and not self.eval_ppl:
            raise SeftkitError("--eval-windows limits --eval-ppl; give --eval-ppl DATA as well")
        if self.nm is not None:
            parse_nm(self.nm)
        if resolve_strategy(self.strategy) == "fsdp" and entry.fsdp_refusal:
            methods = fsdp_methods()
            raise SeftkitError(f"--method {self.method} cannot run sharded: {entry.fsdp_refusal}; use --strategy "
                               f"ddp (fsdp runs {', '.join(methods[:-1])} and {methods[-1]})")

    def ignored_options(self) -> list[str]:
        """Options set away from their defaults that this method does not read (e.g. ``--drop-rate`` for
        masked-lora, ``--eviction`` when nothing revives), as CLI flags."""
        entry = REPAIR_METHODS[self.method]
        revives = entry.revives and self.revive and self.nm is None
        used = set(entry.options) - (set() if revives else set(REVIVAL_OPTIONS))
        specific = {name for e in REPAIR_METHODS.values() for name in e.options}
        return ["--" + f.name.replace("_", "-") for f in fields(self)
                if f.name in specific - used and getattr(self, f.name) != f.default]

    def _check_budget(self) -> None:
        if self.delta_density is not None and self.lora_rank_equivalent is not None:
            raise SeftkitError("give either --delta-density or --lora-rank-equivalent, not both (a config built "
                               f"without either has rank {DEFAULT_LORA_RANK_EQUIVALENT}: set it to None)")
        if self.delta_density is None and self.lora_rank_equivalent is None:
            raise SeftkitError("give a trainable budget: --delta-density D or --lora-rank-equivalent R")
        if self.delta_density is not None and not 0 < self.delta_density <= 1:
            raise SeftkitError(f"--delta-density must be in (0, 1], got {self.delta_density}")
        if self.lora_rank_equivalent is not None and self.lora_rank_equivalent < 1:
            raise SeftkitError(f"--lora-rank-equivalent must be at least 1, got {self.lora_rank_equivalent}")

    def _check_data(self) -> None:
        if parse_task_data(self.data) is None:
            if self.max_per_task is not None:
                raise SeftkitError(f"--max-per-task caps multiple-choice task data; --data {self.data} is text")
        else:
            training_tasks(self.data)


def _check_positive(flag: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise SeftkitError(f"{flag} must be a positive number, got {value}")


def resolve_strategy(strategy: str | None) -> str:
    """``strategy``, or when it is not given: ``fsdp`` under an accelerate FSDP launch (``ACCELERATE_USE_FSDP``),
    else ``ddp``."""
    if strategy is None:
        return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") else "ddp"
    if strategy not in STRATEGIES:
        raise SeftkitError(f"unknown --strategy {strategy!r}: use {', '.join(STRATEGIES)}")
    return strategy
