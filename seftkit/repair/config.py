"""Every repair knob in one dataclass: the CLI, the Python API, checkpoints and reports share it."""

from __future__ import annotations

from dataclasses import dataclass, field

from seftkit.data import DEFAULT_TRAIN_TEXT

METHODS = ("seft", "seft-no-revive", "lora-prune", "masked-lora", "static")
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
    # trainable budget: k_l = delta_density * numel, or r * (in + out) (a rank-r LoRA's parameter count)
    delta_density: float | None = None
    lora_rank_equivalent: int | None = 8
    # SEFT topology evolution (see shared SEFT-SPEC.md)
    update_interval: int = 20
    accumulation_steps: int = 5
    drop_rate: float = 0.2
    drop_schedule: str = "cosine"
    # Initial slots: "grad-active" the largest accumulated |dW| inside the active set (pruned weights come back
    # only through the drop-rate-bounded updates); "grad" the same anywhere, then adapt (the spec's literal
    # reading: it swaps about half the slots onto pruned positions at once and measured worse, see README);
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
