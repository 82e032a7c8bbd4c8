"""Evidence that pruning or repair worked: perplexity and zero-shot multiple-choice accuracy, offline.

``evaluate`` is what prune, repair and bench call for before/after numbers; ``perplexity`` and
``score_multiple_choice`` are the two measurements it combines, and :mod:`seftkit.eval.tasks` holds the
task definitions (``TASKS``, ``load_task``, ``MCItem``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from seftkit.data import DEFAULT_HELDOUT_TEXT, load_texts
from seftkit.errors import SeftkitError
from seftkit.eval.multiple_choice import TaskResult, loglikelihoods, score_multiple_choice
from seftkit.eval.perplexity import PerplexityResult, perplexity
from seftkit.eval.tasks import TASKS, MCItem, load_task, parse_task_names

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

__all__ = [
    "EvalReport", "MCItem", "PerplexityResult", "TASKS", "TaskResult", "evaluate", "evaluate_model", "load_task",
    "loglikelihoods", "parse_task_names", "perplexity", "score_multiple_choice",
]


@dataclass
class EvalReport:
    """Everything one evaluation measured; ``mean_acc`` averages ``acc`` over the tasks, as papers tabulate."""

    model: str | None = None
    ppl: PerplexityResult | None = None
    ppl_data: str | None = None
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    mean_acc: float | None = None
    split: str | None = None
    limit: int | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        """A human-readable table for stdout."""
        lines = [f"model {self.model}"] if self.model else []
        if self.ppl is not None:
            p = self.ppl
            lines.append(f"perplexity {p.ppl:.3f} on {self.ppl_data or 'given texts'} "
                         f"(seqlen {p.seqlen}, {p.windows} windows, {p.tokens} predicted tokens)")
        if self.tasks:
            scope = ", ".join(s for s in (self.split and f"split {self.split}",
                                          self.limit and f"first {self.limit}") if s)
            lines.append(f"{'task':<16}{'n':>6}{'acc':>9}{'± se':>8}{'acc_norm':>10}{'± se':>8}"
                         + (f"   ({scope})" if scope else ""))
            for r in self.tasks.values():
                lines.append(f"{r.task:<16}{r.n:>6}{r.acc:>9.4f}{r.stderr:>8.4f}{r.acc_norm:>10.4f}"
                             f"{r.acc_norm_stderr:>8.4f}")
            if self.mean_acc is not None and len(self.tasks) > 1:
                lines.append(f"{'mean acc':<16}{'':>6}{self.mean_acc:>9.4f}")
        lines.append(f"took {self.seconds:.1f} s")
        return "\n".join(lines)


def _check_arguments(tasks: str | list[str] | None, seqlen: int, limit: int | None, batch_size: int) -> list[str]:
    """Refuse bad arguments up front (before a model loads or any compute runs); returns the task names."""
    for what, value, least in (("seqlen", seqlen, 2), ("limit", limit, 1), ("batch size", batch_size, 1)):
        if value is not None and value < least:
            raise SeftkitError(f"{what} must be at least {least}, got {value}")
    return parse_task_names(tasks) if tasks else []


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | list[str] | None = None,
    ppl_texts: list[str] | str | None = None,
    seqlen: int = 512,
    limit: int | None = None,
    split: str | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> EvalReport:
    """Perplexity on ``ppl_texts`` (documents, or a data spec such as ``"olmo:lambada:heldout"``) and accuracy
    on ``tasks`` (names or a comma-separated string). With neither, perplexity on the bundled held-out text.

    ``limit`` caps the questions per task (the first ones of the split, so runs are comparable);
    ``batch_size`` is windows per forward for perplexity and questions per forward for tasks.
    """
    started = time.perf_counter()
    names = _check_arguments(tasks, seqlen, limit, batch_size)
    if ppl_texts is None and not names:
        ppl_texts = DEFAULT_HELDOUT_TEXT
    report = EvalReport(split=split, limit=limit)
    items = {name: load_task(name, split, limit) for name in names}  # bad data fails before any compute
    if ppl_texts is not None:
        if isinstance(ppl_texts, str):
            report.ppl_data, ppl_texts = ppl_texts, load_texts(ppl_texts)
        report.ppl = perplexity(model, tokenizer, ppl_texts, seqlen, batch_size, progress=progress)
        log.info("perplexity %.3f (seqlen %d, %d windows)", report.ppl.ppl, report.ppl.seqlen, report.ppl.windows)
    for name, questions in items.items():  # each result is logged as it lands: long runs show partial numbers
        result = report.tasks[name] = score_multiple_choice(model, tokenizer, questions, batch_size, name, progress)
        log.info("%s: acc %.4f ± %.4f, acc_norm %.4f (n %d)", name, result.acc, result.stderr, result.acc_norm,
                 result.n)
    if report.tasks:
        report.mean_acc = sum(r.acc for r in report.tasks.values()) / len(report.tasks)
    report.seconds = time.perf_counter() - started
    return report


def evaluate_model(
    spec: str,
    tasks: str | list[str] | None = None,
    ppl: str | None = None,
    seqlen: int = 512,
    limit: int | None = None,
    split: str | None = None,
    batch_size: int = 4,
    device: str = "auto",
    dtype: str = "fp32",
    progress: bool = True,
) -> EvalReport:
    """Load a model folder or built-in name and :func:`evaluate` it; ``ppl`` is a data spec.

    Arguments are checked before the model is loaded, so a typo costs no time.
    """
    from seftkit.models import load_model

    _check_arguments(tasks, seqlen, limit, batch_size)
    model, tokenizer = load_model(spec, device=device, dtype=dtype)
    report = evaluate(model, tokenizer, tasks, ppl, seqlen, limit, split, batch_size, progress)
    report.model = str(spec)
    return report
