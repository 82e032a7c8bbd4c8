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
from seftkit.eval.multiple_choice import TaskResult, accuracy_stderr, loglikelihoods, score_multiple_choice
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
    """Everything one evaluation measured. Over several tasks: ``mean_acc`` (= macro) averages ``acc`` over the
    tasks, as papers tabulate; ``micro_acc`` pools every question (large tasks weigh more, and its standard
    error ``micro_stderr`` is the one a paired comparison of models needs); ``gold_loglik`` pools the correct
    options' log-likelihoods."""

    model: str | None = None
    ppl: PerplexityResult | None = None
    ppl_data: str | None = None
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    mean_acc: float | None = None
    mean_acc_norm: float | None = None
    micro_acc: float | None = None
    micro_acc_norm: float | None = None
    micro_stderr: float | None = None
    gold_loglik: float | None = None
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
                n = sum(r.n for r in self.tasks.values())
                lines.append(f"{'micro (pooled)':<16}{n:>6}{self.micro_acc:>9.4f}{self.micro_stderr:>8.4f}"
                             f"{self.micro_acc_norm:>10.4f}")
                lines.append(f"{'macro (mean)':<16}{'':>6}{self.mean_acc:>9.4f}{'':>8}{self.mean_acc_norm:>10.4f}")
            if self.gold_loglik is not None:
                lines.append(f"mean log-likelihood of the correct answer {self.gold_loglik:.4f}")
        lines.append(f"took {self.seconds:.1f} s")
        return "\n".join(lines)


def average_tasks(report: EvalReport) -> None:
    """Fill the macro and micro averages and the pooled gold log-likelihood from ``report.tasks``."""
    results = list(report.tasks.values())
    n = sum(r.n for r in results)
    report.mean_acc = sum(r.acc for r in results) / len(results)
    report.mean_acc_norm = sum(r.acc_norm for r in results) / len(results)
    report.micro_acc = sum(r.acc * r.n for r in results) / n
    report.micro_acc_norm = sum(r.acc_norm * r.n for r in results) / n
    report.micro_stderr = accuracy_stderr(report.micro_acc, n)
    report.gold_loglik = sum(r.gold_loglik * r.n for r in results) / n


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
    per_question: bool = False,
    ppl_windows: int | None = None,
) -> EvalReport:
    """Perplexity on ``ppl_texts`` (documents, or a data spec such as ``"olmo:lambada:heldout"``) and accuracy
    on ``tasks`` (names or a comma-separated string). With neither, perplexity on the bundled held-out text.

    ``limit`` caps the questions per task (the first ones of the split, so runs are comparable);
    ``batch_size`` is windows per forward for perplexity and questions per forward for tasks;
    ``per_question`` keeps every question's 0/1 outcome in the task results; ``ppl_windows`` scores only the
    first windows of the perplexity text (a quicker, still deterministic estimate).
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
        report.ppl = perplexity(model, tokenizer, ppl_texts, seqlen, batch_size, ppl_windows, progress=progress)
        log.info("perplexity %.3f (seqlen %d, %d windows)", report.ppl.ppl, report.ppl.seqlen, report.ppl.windows)
    for name, questions in items.items():  # each result is logged as it lands: long runs show partial numbers
        result = report.tasks[name] = score_multiple_choice(model, tokenizer, questions, batch_size, name, progress,
                                                             per_question)
        log.info("%s: acc %.4f ± %.4f, acc_norm %.4f (n %d)", name, result.acc, result.stderr, result.acc_norm,
                 result.n)
    if report.tasks:
        average_tasks(report)
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
