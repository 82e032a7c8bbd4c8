"""A frozen linear plus a trainable sparse delta: ``y = x (W + scatter(I, d))^T + b``.

Only the ``k`` delta values ``d`` are trained, so the optimizer holds state for ``k`` numbers, not for the
matrix. The custom autograd function keeps training memory O(k) per layer besides the frozen weight:

* forward forms the effective weight ``T`` only for its matmul (by writing the k sums into ``W`` and putting
  the base values back, see :func:`applied_delta`) and keeps only ``x``, ``W``, ``I`` and ``d``;
* backward forms ``T`` again for the input gradient and the dense weight gradient ``dW`` only transiently,
  gathering ``grad_d = dW.flatten()[I]`` from it (the SpIEL recipe).

While a layer is in "accumulate" mode (the passes before a SEFT topology update) backward also hands the
transient ``dW`` and ``T`` to the layer's ``grad_hook``, which keeps O(k) statistics of them (growth
candidates and sensitivities, see :mod:`seftkit.repair.evolution`).

The only O(out*in) state a :class:`SparseDeltaLinear` adds to the frozen weight is its ``active`` mask: the
positions allowed to be non-zero, which SEFT evolves and ``merge`` applies. It is stored as bits (1/8 byte per
weight, :func:`pack_bits`); ``active`` unpacks a bool copy for the one layer being worked on and
``set_active`` writes one back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seftkit.models import linear_weight
from seftkit.repair.sharding import full_linear_weight, write_linear_weight, zero_linear_weight

GradHook = Callable[[torch.Tensor, torch.Tensor], None]
"""Called in backward as ``hook(dW, T)`` with the transient dense [out, in] weight gradient and the effective weight
(often the frozen weight itself with the delta written in, see :func:`applied_delta`: read it, never write it)."""

_INT32_LIMIT = 2**31


def index_dtype(numel: int) -> torch.dtype:
    """Flat indices are stored as int32 where they fit (half the memory of int64) and widened for compute."""
    return torch.int32 if numel < _INT32_LIMIT else torch.int64


def gather_flat(weight: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``weight.flatten()[positions]`` for an [out, in] tensor or view (no copy of the matrix, even when the
    view is transposed as for GPT-2 Conv1D)."""
    positions = positions.long()
    if weight.is_contiguous():  # the common case: index_select is ~10x faster than row/column indexing
        return weight.view(-1).index_select(0, positions)
    in_features = weight.shape[1]
    return weight[positions // in_features, positions % in_features]


def effective_weight(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``W + scatter(I, d)`` as a new contiguous [out, in] tensor in ``dtype``.

    The sum at the delta positions is formed in at least fp32 and rounded once, so a bf16 ``W`` plus a small
    fp32 ``d`` does not lose ``d`` to a bf16 addition. ``indices`` must be unique (SEFT slots always are).
    """
    result = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    result.copy_(weight)
    idx = indices.long()
    result.view(-1).index_copy_(0, idx, _slot_sums(gather_flat(weight, idx), values, dtype))
    return result


def _slot_sums(base: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``base + values`` formed in at least fp32 and rounded once to ``dtype`` (both ways of applying the delta
    use this, so they agree bit for bit)."""
    wide = torch.promote_types(torch.promote_types(dtype, values.dtype), torch.float32)
    return (base.to(wide) + values.to(wide)).to(dtype)


@contextmanager
def applied_delta(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """``W + scatter(I, d)`` in ``dtype`` for the duration of the block.

    Where ``W`` can hold exactly what :func:`effective_weight` would compute (same dtype, contiguous), the sum
    is written into ``W`` itself at the k slots and the k base values are put back on exit, also on an error:
    O(k) work instead of copying the matrix twice per layer and step (~8% of a SmolLM2 step on CPU). The
    values seen inside are bit-identical to the copy's. Otherwise the block gets a fresh copy. The writes go
    through ``W.data``, which autograd does not version: another op that saved the same (shared) weight for
    its backward still finds it unchanged, as it is once the block ends.
    """
    if weight.dtype != dtype or not weight.is_contiguous():
        yield effective_weight(weight, indices, values, dtype)
        return
    idx = indices.long()
    flat = weight.data.view(-1)
    base = flat.index_select(0, idx)
    flat.index_copy_(0, idx, _slot_sums(base, values, dtype))
    try:
        yield weight
    finally:
        flat.index_copy_(0, idx, base)


class SparseDeltaFunction(torch.autograd.Function):
    """Autograd for ``F.linear(x, W + scatter(I, d), b)`` that never saves a dense [out, in] tensor.

    ``W`` is kept on ``ctx`` rather than saved for backward: :func:`applied_delta` updates it in place (and
    restores it), which autograd's saved-tensor version check would reject.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        indices: torch.Tensor,
        values: torch.Tensor,
        grad_hook: GradHook | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, indices, values)
        ctx.weight = weight
        ctx.grad_hook = grad_hook
        ctx.has_bias = bias is not None
        with applied_delta(weight, indices, values, x.dtype) as effective:
            return F.linear(x, effective, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, indices, values = ctx.saved_tensors
        need_x, _, need_bias, _, need_values, _ = ctx.needs_input_grad
        grad_y = grad_y.to(x.dtype)
        hook = ctx.grad_hook
        grad_x = grad_bias = grad_values = None
        needs_weight = need_x or hook is not None  # the weight gradient alone needs no T
        with applied_delta(ctx.weight, indices, values, x.dtype) if needs_weight else nullcontext() as effective:
            if need_x:
                grad_x = grad_y.matmul(effective)
            if need_values or hook is not None:
                dense_grad = grad_y.reshape(-1, grad_y.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
                if need_values:
                    grad_values = dense_grad.view(-1).index_select(0, indices.long()).to(values.dtype)
                if hook is not None:
                    hook(dense_grad, effective)
                del dense_grad
        if need_bias and ctx.has_bias:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None, grad_values, None


_SPREAD_BYTES = 0x0102040810204080
"""Multiplying 8 little-endian 0/1 bytes by this gathers byte ``i`` into bit ``56 + i`` (no two terms collide)."""
_BYTE_BITS = ((torch.arange(256, dtype=torch.uint8).unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).bool()
"""Row ``b``: the 8 bits of byte ``b``, lowest first."""


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bits, bit ``i`` of byte ``j`` holding flat position ``8 j + i`` (zero-padded)."""
    flat = mask.reshape(-1).view(torch.uint8)
    words = F.pad(flat, (0, -flat.numel() % 8)).view(torch.int64)
    return (words * _SPREAD_BYTES >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The bool tensor of ``shape`` that :func:`pack_bits` packed (a table lookup per byte)."""
    bits = _BYTE_BITS.to(packed.device).index_select(0, packed.long())
    return bits.view(-1)[: math.prod(shape)].view(shape)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Honour autocast (e.g. bf16 on CUDA) like nn.Linear does; otherwise compute in the input's dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class SparseDeltaLinear(nn.Module):
    """Wraps a linear (``nn.Linear`` or GPT-2 ``Conv1D``) whose weight stays frozen, adding ``k`` trainable
    fp32 delta values at flat [out, in] positions ``indices``.

    ``indices`` (int32 where they fit) and ``active_bits`` (the active mask, packed) are buffers; ``values`` is
    the only parameter.
    ``grad_hook`` is set by the owner (SEFT) only while it accumulates statistics for a topology update; the
    forward pass captures it, so it must be set before the forward whose backward should report to it.
    """

    def __init__(self, base: nn.Module, indices: torch.Tensor, active: torch.Tensor | None = None) -> None:
        super().__init__()
        for param in base.parameters():
            param.requires_grad_(False)
        self.base = base
        weight = linear_weight(base)
        if indices.dim() != 1 or (indices.numel() and int(indices.max()) >= weight.numel()):
            raise ValueError(f"indices must be flat positions into a {tuple(weight.shape)} weight")
        self.register_buffer("indices", indices.to(device=weight.device, dtype=index_dtype(weight.numel())))
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=torch.float32, device=weight.device))
        if active is None:
            active = weight != 0
        self.register_buffer("active_bits", pack_bits(active.to(device=weight.device, dtype=torch.bool)))
        self.grad_hook: GradHook | None = None

    @property
    def active(self) -> torch.Tensor:
        """The active mask as a fresh bool [out, in] tensor (writing to it changes nothing: use
        :meth:`set_active`)."""
        return unpack_bits(self.active_bits, (self.out_features, self.in_features))

    def set_active(self, active: torch.Tensor) -> None:
        """Store a new active mask ([out, in] or flat bool)."""
        self.active_bits.copy_(pack_bits(active.to(device=self.active_bits.device, dtype=torch.bool)))

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight as an [out, in] view; under FSDP, outside forward, a gathered copy (all ranks
        must read it together; write through :meth:`clear_weights` / :meth:`merge_into_base`)."""
        return full_linear_weight(self.base)

    @property
    def in_features(self) -> int:
        return linear_weight(self.base).shape[1]

    @property
    def out_features(self) -> int:
        return linear_weight(self.base).shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return SparseDeltaFunction.apply(
                x.to(dtype), linear_weight(self.base), self.base.bias, self.indices, self.values, self.grad_hook
            )

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``(W + scatter(I, d)) * active`` in fp32, [out, in]."""
        merged = effective_weight(self.weight, self.indices, self.values, torch.float32)
        return merged.mul_(self.active)

    def clear_weights(self, positions: torch.Tensor) -> None:
        """Set the base weight to zero at flat positions (positions SEFT removed from the active set)."""
        zero_linear_weight(self.base, positions)

    def merge_into_base(self) -> nn.Module:
        """Write the merged weight into the base module and return it (frozen flags are left to the caller)."""
        write_linear_weight(self.base, self.merged_weight())
        return self.base

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.values.numel()}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule called ``name`` (dotted full name) is; return the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
