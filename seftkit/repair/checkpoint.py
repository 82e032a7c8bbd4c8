"""Resumable repair checkpoints in ``<out>.ckpt/``, written atomically (a kill never leaves a torn one).

Each checkpoint is written to a partial file inside that folder and renamed over ``state.pt`` in one step, so a
kill at any moment leaves the previous checkpoint or the new one, never neither, and nothing outside the folder
(which is removed once the output is written).

A checkpoint holds what an uninterrupted run would still have in memory after step ``step``: the trainable
values, the method's own state (SEFT's indices and masks), the optimizer, every RNG, the loss curve and events.
The data position is the step itself (micro-batches are a pure function of their index, see ``batches``).
The config and a digest of every target weight of the input model are stored too, and a resume under a
different config or from another model is refused rather than silently mixed.
Distributed, rank 0 writes (every replica holds the same state) and every rank resumes from that one file, so
``<out>.ckpt`` must be on a filesystem all ranks share.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seftkit.distributed import barrier, tensor_digest, world
from seftkit.errors import SeftkitError, first_line
from seftkit.models import linear_weight
from seftkit.repair.config import RepairConfig
from seftkit.repair.method import RepairMethod

STATE_FILE = "state.pt"
PARTIAL_FILE = ".state.pt.partial"
STATE_KEYS = frozenset({"config", "trainable", "method", "optimizer", "rng", "progress"})
# Fields that may change between a run and its resume without changing the result.
RUNTIME_FIELDS = frozenset({"device", "strategy", "checkpoint_every", "log_every", "eval_ppl", "eval_tasks",
                            "eval_limit", "eval_windows"})


def checkpoint_dir_for(out: str | Path) -> Path:
    """``<out>.ckpt`` next to the output folder."""
    out = Path(out).expanduser().resolve()
    return out.with_name(out.name + ".ckpt")


@dataclass
class Progress:
    """What the loop carries from step to step, besides the model, method and optimizer."""

    step: int = 0  # steps completed (the next step to run)
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)  # target name -> digest of its input weight
    loss_curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def input_digests(targets: dict[str, nn.Module]) -> dict[str, str]:
    """What identifies the model a run started from: a content hash of each target weight before training."""
    return {name: tensor_digest(linear_weight(module)) for name, module in targets.items()}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _comparable(config: RepairConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_FIELDS}


def save_checkpoint(path: Path, config: RepairConfig, method: RepairMethod, optimizer: torch.optim.Optimizer,
                    progress: Progress) -> None:
    """Replace the checkpoint at ``path`` with the state after ``progress.step`` steps (rank 0 writes, every
    rank returns once it is in place)."""
    if not world().is_main:
        barrier()
        return
    state = {
        "config": _comparable(config),
        "trainable": [p.detach().cpu() for p in method.trainable_parameters()],
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        "progress": dataclasses.asdict(progress),
    }
    try:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(state, path / PARTIAL_FILE)
        os.replace(path / PARTIAL_FILE, path / STATE_FILE)
    except OSError as exc:
        raise SeftkitError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    barrier()


def has_checkpoint(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def load_checkpoint(path: Path, config: RepairConfig, method: RepairMethod, optimizer: torch.optim.Optimizer,
                    inputs: dict[str, str]) -> Progress:
    """Restore a checkpoint into an attached method and its optimizer; returns where to continue.

    ``inputs`` (:func:`input_digests` of the model about to be trained) must match the checkpoint's: a
    checkpoint left in ``<out>.ckpt`` by a run on another model is refused before anything is loaded from it.
    """
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file (truncated, garbled, empty) is the same user-facing problem
        raise SeftkitError(f"cannot read checkpoint {path}: {first_line(exc)}") from None
    if not isinstance(state, dict) or not STATE_KEYS <= state.keys():
        raise SeftkitError(f"cannot read checkpoint {path}: it is not a seftkit repair checkpoint")
    saved, current = state["config"], _comparable(config)
    changed = sorted(k for k in current if saved.get(k) != current[k])
    if changed:
        raise SeftkitError(f"checkpoint {path} was made with different settings ({', '.join(changed)}); "
                           "rerun with the same options, or delete it to start over")
    saved_inputs = state["progress"].get("inputs", {})
    if saved_inputs != inputs:
        differing = next((name for name in inputs if saved_inputs.get(name) != inputs[name]), "its target layers")
        raise SeftkitError(f"checkpoint {path} was made for another model ({differing} differs); resume with the "
                           "model it was made from, or delete it to start over")
    method.load_state_dict(state["method"])
    params = method.trainable_parameters()
    if [tuple(p.shape) for p in params] != [tuple(t.shape) for t in state["trainable"]]:
        raise SeftkitError(f"checkpoint {path} does not match this model's trainable parameters")
    with torch.no_grad():
        for param, value in zip(params, state["trainable"], strict=True):
            param.copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    progress = state["progress"]
    return Progress(step=progress["step"], inputs=inputs, loss_curve=[tuple(x) for x in progress["loss_curve"]],
                    events=progress["events"])
