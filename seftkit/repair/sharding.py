"""FSDP for repair: the frozen weights sharded over the processes with torch's FSDP2 (``fully_shard``).

With ``--strategy fsdp`` (or under an ``accelerate launch`` configured for FSDP) every decoder block and then the
root module are sharded along dim 0 over all ranks (DTensor ``Shard(0)``, torch.chunk rows), so between forwards
each process holds 1/N of the base weights; a block is all-gathered for its forward and again for its backward.
The method's trainable state (SEFT's delta values, masked LoRA's A/B) is small and stays replicated: it is kept
out of FSDP (``ignored_params``) and its gradients are averaged over ranks on seftkit's own group before every
optimizer step, as DDP would. So the optimizer, checkpoints and ``--resume`` are exactly those of a DDP run.

Outside forward/backward, a read of a sharded weight (SEFT's topology updates, the merge, the output checks)
gathers that one layer's full [out, in] matrix on every rank, so every rank must make the same reads in the same
order (they do: all decisions are replicated); writes (SEFT zeroing removed positions, the merge) go to the rows
this rank holds. ``static`` trains the weight matrices themselves and ``lora-prune`` merges through peft and
re-prunes with Wanda, both on plain weights: the method registry refuses them. Not sharded either: SEFT's
``active`` masks and index buffers (1 bit per target weight, replicated).

Every process loads the input model into CPU memory first; ``fully_shard`` then moves only its own shards to the
device, block by block.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from seftkit.distributed import all_reduce_mean_, world
from seftkit.models import find_decoder_layers, linear_weight
from seftkit.repair.config import resolve_strategy


def uses_fsdp(strategy: str | None) -> bool:
    """Whether this run shards the model (FSDP asked for and more than one process)."""
    return resolve_strategy(strategy) == "fsdp" and world().distributed


def shard_model(model: nn.Module, replicated: list[nn.Parameter], device: torch.device) -> None:
    """``fully_shard`` every decoder block, then the root (embeddings, head, final norm), onto ``device``.

    ``replicated`` (the trainable parameters) stays whole on every rank and is moved to ``device`` here, as are
    the buffers (SEFT's masks and slots).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world().world_size,))
    ignored = set(replicated)
    _, layers = find_decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    with torch.no_grad():
        for param in ignored:
            param.data = param.data.to(device)
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device != device:
                    module._buffers[name] = buffer.to(device)


@torch.no_grad()
def allocate_gather_buffers(model: nn.Module, device: torch.device) -> None:
    """One forward of one token, outside ``torch.inference_mode``.

    FSDP allocates each block's all-gather buffers on its first forward and reuses them; allocated under
    inference mode (as seftkit's evaluation runs) they become inference tensors that training cannot write.
    """
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)


def average_gradients_(params: list[nn.Parameter]) -> None:
    """Average the gradients of replicated parameters over ranks, one all-reduce per dtype (FSDP skips them)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
    for param in params:
        if param.grad is not None:  # None on every rank alike: all ranks run the same graph
            groups[param.grad.dtype].append(param.grad)
    for grads in groups.values():
        flat = all_reduce_mean_(torch.cat([grad.reshape(-1) for grad in grads]))
        for grad, part in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
            grad.copy_(part.view_as(grad))


def full_linear_weight(module: nn.Module) -> torch.Tensor:
    """A linear's [out, in] weight; when sharded, gathered from every rank (a collective: all ranks call it)."""
    weight = linear_weight(module)
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def _local_rows(module: nn.Module) -> tuple[torch.Tensor, int, bool]:
    """This rank's rows of a sharded weight (in the parameter's own layout), the global index of the first, and
    whether that layout is [in, out] (GPT-2 Conv1D)."""
    param = module.weight
    if param.placements != (Shard(0),):
        raise RuntimeError(f"expected a weight sharded on dim 0, got {param.placements}")
    local = param.to_local()
    rows = param.shape[0]
    chunk = -(-rows // param.device_mesh.size())  # fully_shard splits like torch.chunk
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    if local.shape[0] != min(chunk, rows - start):
        raise RuntimeError(f"unexpected shard of {tuple(local.shape)} rows at {start} of {rows}")
    return local, start, linear_weight(module) is not param


@torch.no_grad()
def write_linear_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Copy ``value`` ([out, in]) into a linear's weight: all of it, or this rank's rows when sharded."""
    if not isinstance(module.weight, DTensor):
        linear_weight(module).copy_(value)
        return
    local, start, transposed = _local_rows(module)
    layout = value.t() if transposed else value
    local.copy_(layout[start:start + local.shape[0]])


@torch.no_grad()
def zero_linear_weight(module: nn.Module, positions: torch.Tensor) -> None:
    """Set a linear's weight to 0 at flat [out, in] ``positions`` (those in this rank's rows when sharded)."""
    positions = positions.long()
    weight = linear_weight(module)
    if not isinstance(module.weight, DTensor) and weight.is_contiguous():
        weight.view(-1).index_fill_(0, positions, 0)  # ~20x faster than [rows, cols] = 0
        return
    in_features = weight.shape[1]
    rows, cols = positions // in_features, positions % in_features
    if not isinstance(module.weight, DTensor):
        weight[rows, cols] = 0
        return
    local, start, transposed = _local_rows(module)
    if transposed:
        rows, cols = cols, rows
    mine = (rows >= start) & (rows < start + local.shape[0])
    local[rows[mine] - start, cols[mine]] = 0


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights in rank 0's CPU memory, to write an ordinary HF folder (a collective: every
    rank calls it; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
