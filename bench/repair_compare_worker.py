"""One measured run of the repair bench, in its own interpreter: load, optionally repair, evaluate.

A job is a JSON dict; the result is a JSON dict (or ``{"error": ...}`` when the process failed). Two evaluation
modes: ``text`` (val/test perplexity on the two halves of the held-out text, zero-shot accuracy beside it) and
``tasks`` (accuracy on the tasks' ``val`` questions, which picks the learning rate, and on every ``heldout``
question with each question's 0/1 outcome kept, so runs can be compared question by question).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seftkit.data import DEFAULT_HELDOUT_TEXT

WANDA_SEQLEN = 512


def heldout_halves() -> tuple[list[str], list[str]]:
    """``val`` (LR selection) and ``test`` (reported): alternate passages of the held-out text."""
    from seftkit.data import load_texts

    texts = load_texts(DEFAULT_HELDOUT_TEXT)
    return texts[0::2], texts[1::2]


def ensure_pruned(model: str, sparsity: float, samples: int, workdir: Path, method: str = "wanda") -> Path:
    """The pruned model folder (``samples`` calibration windows of the default training text; magnitude uses
    none), made once and reused by every run."""
    from seftkit.prune import prune_checkpoint
    from seftkit.sparsity.pattern import parse_pattern

    out = workdir / f"{Path(model).name}-{method}-{round(sparsity * 100)}-n{samples}"
    if not (out / "config.json").is_file():
        prune_checkpoint(model, method, parse_pattern(sparsity), out=out, nsamples=samples,
                         seqlen=WANDA_SEQLEN, device="cpu")
    return out


def reset_peak_rss() -> None:
    """Reset the kernel's resident-memory high-water mark (Linux ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_since_reset_mb() -> float:
    """``VmHWM``: the resident high-water mark since the last :func:`reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (the memory columns need Linux)")


def code_fingerprint() -> str:
    """A hash of the library's training and evaluation sources: a saved SEFT run is reused only when it was
    made by the same code (SEFT's evolution changes between runs of the bench; the baselines' code does not)."""
    import seftkit

    root = Path(seftkit.__file__).parent
    digest = hashlib.sha1()
    for path in sorted([*root.glob("repair/*.py"), *root.glob("eval/*.py"), root / "data.py", root / "models.py"]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def outcomes(values: list[int] | None) -> str:
    """0/1 outcomes as a compact string for the JSON (``"0110..."``)."""
    return "".join(map(str, values or []))


def task_scores(model: Any, tokenizer: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Accuracy on the ``val`` questions (micro, macro, gold log-likelihood) and on the ``heldout`` ones (those,
    per task acc/acc_norm/chance/n, and every question's outcome)."""
    from seftkit.eval import evaluate

    result: dict[str, Any] = {}
    batch = job.get("eval_batch_size", 8)
    if job.get("val_tasks"):
        val = evaluate(model, tokenizer, tasks=job["val_tasks"], limit=job.get("val_limit"), split="val",
                       batch_size=batch, progress=False)
        result.update(val_acc=val.micro_acc, val_macro_acc=val.mean_acc, val_gold_loglik=val.gold_loglik)
    test = evaluate(model, tokenizer, tasks=job["eval_tasks"], limit=job.get("eval_limit"), split="heldout",
                    batch_size=batch, progress=False, per_question=True)
    tasks = test.tasks.values()
    result.update(
        test_acc=test.micro_acc, test_macro_acc=test.mean_acc, test_acc_norm=test.micro_acc_norm,
        test_macro_acc_norm=test.mean_acc_norm, test_gold_loglik=test.gold_loglik, eval_s=test.seconds,
        acc={t.task: t.acc for t in tasks}, acc_norm={t.task: t.acc_norm for t in tasks},
        gold_loglik={t.task: t.gold_loglik for t in tasks}, chance={t.task: t.chance for t in tasks},
        n={t.task: t.n for t in tasks}, mean_acc=test.mean_acc,
        correct={t.task: outcomes(t.correct) for t in tasks},
        correct_norm={t.task: outcomes(t.correct_norm) for t in tasks},
    )
    return result


def text_scores(model: Any, tokenizer: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Val/test perplexity on the held-out text's halves, and zero-shot accuracy beside it."""
    from seftkit.eval import evaluate, perplexity

    result: dict[str, Any] = {}
    val, test = heldout_halves()
    for name, texts in (("val", val), ("test", test)):
        result[f"{name}_ppl"] = perplexity(model, tokenizer, texts, seqlen=job["eval_seqlen"],
                                           max_windows=job["eval_windows"], progress=False).ppl
    if job.get("eval_tasks"):
        tasks = evaluate(model, tokenizer, tasks=job["eval_tasks"], limit=job["eval_limit"], split="heldout",
                         progress=False)
        result["acc"] = {name: task.acc for name, task in tasks.tasks.items()}
        result["mean_acc"] = tasks.mean_acc
    return result


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measured run (inside its own process): optional repair, then the job's evaluation."""
    import psutil

    from seftkit.models import check_finite, load_model
    from seftkit.models import eval_mode as inference
    from seftkit.repair import RepairConfig, repair_model

    device = job.get("device", "cpu")
    model, tokenizer = load_model(job["model"], device=device)
    check_finite(model)  # reads every weight, so the memory-mapped model is resident before the baseline
    loaded_mb = psutil.Process().memory_info().rss / 2**20
    result: dict[str, Any] = {"loaded_rss_mb": loaded_mb, "code": code_fingerprint()}
    if job.get("config"):
        reset_peak_rss()  # loading can spike above what training needs; measure training alone
        report = repair_model(model, tokenizer, RepairConfig(**job["config"]), progress=False)
        peak_mb = peak_rss_since_reset_mb()
        result.update(trainable=report.trainable_params, step_time_s=report.step_time_s, peak_rss_mb=peak_mb,
                      train_extra_mb=peak_mb - loaded_mb, final_loss=report.final_loss, summary=report.method_summary)
    if not job.get("evaluate", True):
        return result
    with inference(model):
        result.update(task_scores(model, tokenizer, job) if job.get("mode") == "tasks"
                      else text_scores(model, tokenizer, job))
    return result


def run_job(job: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter (``env`` added to its environment); a diverged or failed run
    is reported, not raised."""
    return run_in_subprocess("seftkit.bench.repair_compare", job, env)


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The hidden ``--worker JOB.json --result OUT.json`` that :func:`run_in_subprocess` calls a bench with."""
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)


def serve_worker(args: argparse.Namespace, worker: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """Run ``worker`` on the job file when this process was started as one; False in the bench's own process."""
    if not args.worker:
        return False
    args.result.write_text(json.dumps(worker(json.loads(args.worker.read_text()))))
    return True


def run_in_subprocess(module: str, job: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """``python -m module --worker`` on ``job`` in a fresh interpreter (so peak memory and imports are its own);
    a failed run is an ``{"error": last stderr line}`` result."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", module, "--worker", str(spec), "--result", str(out)],
                              capture_output=True, text=True, env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
        return json.loads(out.read_text())
