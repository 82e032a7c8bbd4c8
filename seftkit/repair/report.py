"""What a repair run reports: one dataclass shared by the API, the CLI (`seft_report.json`, `--json`) and the bench.

Every method fills the same fields, so runs of different methods compare column by column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from seftkit.repair.config import RepairConfig

REPORT_NAME = "seft_report.json"


@dataclass
class LayerSparsity:
    """One target linear before and after repair (nnz must not grow; N:M must stay valid)."""

    numel: int
    nnz_before: int
    nnz_after: int | None = None


@dataclass
class RepairReport:
    config: RepairConfig
    method: str
    trainable_params: int
    total_params: int
    device: str
    processes: int = 1  # torch.distributed ranks that trained together
    global_batch_size: int | None = None  # windows per optimizer step: batch_size x processes x grad_accum
    steps_done: int = 0
    resumed_from_step: int | None = None
    lr_schedule: str = "linear warmup, then linear decay to 0"
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    method_summary: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, LayerSparsity] = field(default_factory=dict)
    sparsity_before: float = 0.0
    sparsity_after: float | None = None
    eval_before: dict[str, float] = field(default_factory=dict)
    eval_after: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    step_time_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None
    output: str | None = None

    @property
    def final_loss(self) -> float | None:
        return self.loss_curve[-1][1] if self.loss_curve else None

    def summary_lines(self) -> list[str]:
        """The human summary the CLI prints on stdout."""
        lines = [
            f"method {self.method}: {self.steps_done} steps, {self.trainable_params:,} trainable parameters "
            f"({self.trainable_params / max(self.total_params, 1):.3%} of the model)",
            f"loss {self.loss_curve[0][1]:.4f} -> {self.final_loss:.4f}" if self.loss_curve else "no steps run",
            f"sparsity {self.sparsity_before:.2%} -> {self.sparsity_after:.2%}" if self.sparsity_after is not None
            else f"sparsity {self.sparsity_before:.2%}",
        ]
        if self.processes > 1:
            lines.append(f"{self.processes} processes, global batch {self.global_batch_size} windows per step "
                         f"({self.config.batch_size} per process x {self.processes} x {self.config.grad_accum} "
                         "grad-accum)")
        for key, value in self.eval_after.items():
            before = self.eval_before.get(key)
            lines.append(f"{key}: {before:.4f} -> {value:.4f}" if before is not None else f"{key}: {value:.4f}")
        for key, value in self.method_summary.items():
            if key == "layers":  # per-layer detail belongs in the JSON report
                continue
            lines.append(f"{key}: {value}")
        lines.append(
            f"time {self.wall_time_s:.1f} s ({self.step_time_s * 1000:.0f} ms/step), peak RSS {self.peak_rss_mb:.0f} MB"
            + (f", peak CUDA {self.peak_cuda_mb:.0f} MB" if self.peak_cuda_mb is not None else "")
        )
        if self.output:
            lines.append(f"wrote {self.output}")
        return lines
