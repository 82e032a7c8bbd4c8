"""Multi-process runs on torch.distributed, as launched by ``torchrun`` or ``accelerate launch``.

seftkit never spawns processes itself: the launcher starts one process per device and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_distributed` joins them into a process group (gloo on CPU, nccl on
CUDA). Without those variables everything here is a no-op, so single-process code paths stay bit-identical.
Library users call :func:`init_distributed` themselves before ``prune_model`` / ``repair_model``; the
``*_checkpoint`` functions (and so the CLI) do it.

``seftkit prune`` replicates the model on every rank. ``seftkit repair`` replicates it with DDP, or shards it
with FSDP2 under ``--strategy fsdp`` or an ``accelerate launch`` configured for FSDP (see
:mod:`seftkit.repair.sharding`).

Besides the default group (which DDP's gradient buckets use), a second group of the same ranks carries seftkit's
own collectives (SEFT's dense gradients in backward, loss values, consistency checks), so they never interleave
with DDP's asynchronous all-reduces on one communicator.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from seftkit.errors import SeftkitError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (``rank 0 of 1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None  # seftkit's own process group (None when not distributed)
    device: str = "cpu"  # this rank's device (cuda:LOCAL_RANK on CUDA)

    @property
    def is_main(self) -> bool:
        """Only the main rank writes checkpoints, outputs and reports, and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_WORLD = World()


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by the launcher (1 when run as a plain process)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise SeftkitError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def init_distributed(device: str) -> tuple[World, str]:
    """Join the launcher's process group once (later calls return the same world) and pick this rank's device.

    ``device`` is the resolved ``--device``; on CUDA each rank takes ``cuda:LOCAL_RANK``. Returns the world and
    the device to load the model on.
    """
    global _WORLD
    if launched_world_size() <= 1:
        return _WORLD, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if _WORLD.group is None:
        _WORLD = World(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       group=dist.new_group(backend="nccl" if device.startswith("cuda") else "gloo"), device=device)
    return _WORLD, device


def world() -> World:
    """The world joined by :func:`init_distributed` (a single process if it was never called)."""
    return _WORLD


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a single process); returns it."""
    if _WORLD.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=_WORLD.group)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks in place (no-op in a single process); returns it."""
    if _WORLD.distributed:
        all_reduce_sum_(tensor).div_(_WORLD.world_size)
    return tensor


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint the others may resume from)."""
    if _WORLD.distributed:
        dist.barrier(group=_WORLD.group)


def tensor_digest(tensor: torch.Tensor) -> str:
    """A content hash of ``tensor`` (dtype, shape and bytes)."""
    data = tensor.detach().contiguous().cpu()
    digest = hashlib.blake2b(f"{data.dtype}{tuple(data.shape)}".encode(), digest_size=16)
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def check_same_across_ranks(what: str, tensors: dict[str, torch.Tensor]) -> None:
    """Fail loudly unless every rank holds identical ``tensors`` (same names, same contents).

    Decisions that every rank must make identically (SEFT's topology, pruning masks) are checked with this;
    a mismatch means the replicas have diverged, so continuing would train different models under one name.
    """
    if not _WORLD.distributed:
        return
    mine = [(name, tensor_digest(tensor)) for name, tensor in tensors.items()]
    gathered: list[Any] = [None] * _WORLD.world_size
    dist.all_gather_object(gathered, mine, group=_WORLD.group)
    for rank, theirs in enumerate(gathered):
        if theirs == mine:
            continue
        differing = next((a[0] for a, b in zip(mine, theirs, strict=False) if a != b), "the set of tensors")
        raise SeftkitError(f"ranks disagree on {what}: {differing} differs between rank {_WORLD.rank} and "
                           f"rank {rank}; the replicas have diverged (this is a bug, please report it)")


def shard_rows(total: int) -> slice:
    """This rank's contiguous share of ``total`` rows (shares differ by at most one row)."""
    base, extra = divmod(total, _WORLD.world_size)
    start = _WORLD.rank * base + min(_WORLD.rank, extra)
    return slice(start, start + base + (_WORLD.rank < extra))
