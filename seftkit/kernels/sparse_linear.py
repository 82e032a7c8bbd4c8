"""``SparseLinear``: an ``nn.Linear`` replacement that runs on the native bitmap kernels.

``sparsify_model`` swaps the targeted linears of a Hugging Face model in place, so ``model.generate()``
runs on the kernels with no other change. A layer is only swapped when its compressed form streams fewer
bytes than the dense weight (that is where the speed comes from); when the kernels cannot be built, the
model stays dense with a warning. With ``dense_fallback`` (the default) each call runs on whichever of the
kernel and dense torch was faster for its batch-size bucket (:mod:`seftkit.kernels.dispatch`); the dense weight
is rebuilt from the packed form only for layers where dense won some bucket, and kept for them.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from seftkit.errors import SeftkitError
from seftkit.kernels.build import Isa, kernel_isa, native
from seftkit.kernels.dispatch import DEFAULT_CHOICE, KernelChoice, bucket
from seftkit.kernels.formats import BitmapWeight, dense_bytes_per_weight, pack_bitmap, pack_nm
from seftkit.models import linear_weight, target_linears
from seftkit.sparsity.masks import nm_valid
from seftkit.sparsity.targets import TargetRule

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nm", "unstructured", "dense", "cuda24")
# "auto" keeps a layer dense unless the sparse form streams at most this fraction of the dense bytes:
# near density 1 the bitmap costs more than it saves.
AUTO_MAX_BYTE_RATIO = 0.8
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with W stored bitmap-packed, for inference: no gradient flows through it.

    The packed tensors are non-persistent buffers, so ``state_dict()`` and saved checkpoints stay dense.
    ``dense_fallback=False`` always runs the kernel (and never holds a dense copy); ``choice`` replaces the
    process-wide :data:`~seftkit.kernels.dispatch.DEFAULT_CHOICE` (tests inject timings through it).
    """

    def __init__(self, packed: BitmapWeight, bias: torch.Tensor | None = None, isa: Isa | None = None,
                 dense_fallback: bool = True, choice: KernelChoice | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.nm = packed.nm
        self.isa = kernel_isa(isa)
        self.register_buffer("values", packed.values, persistent=False)
        self.register_buffer("bits", packed.bits, persistent=False)
        self.register_buffer("row_ptr", packed.row_ptr, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.choice = (choice or DEFAULT_CHOICE) if dense_fallback else None
        self._dense: torch.Tensor | None = None
        self._dense_buckets: set[int] = set()  # buckets that run dense here: the dense copy is kept for them
        self._uses_sparse: dict[tuple[int, torch.dtype, int], bool] = {}  # by rows: a hit costs no bucket lookup

    @classmethod
    def from_linear(cls, module: nn.Module, nm: tuple[int, int] | None = None, isa: Isa | None = None,
                    dense_fallback: bool = True, choice: KernelChoice | None = None) -> SparseLinear:
        weight = linear_weight(module).detach()
        packed = pack_nm(weight, *nm) if nm else pack_bitmap(weight)
        return cls(packed, getattr(module, "bias", None), isa, dense_fallback, choice)

    @property
    def packed(self) -> BitmapWeight:
        return BitmapWeight(self.values, self.bits, self.row_ptr, (self.out_features, self.in_features), self.nm)

    @property
    def dense_copy(self) -> torch.Tensor | None:
        """The dense weight this layer holds for its dense buckets, if any (memory: 2 or 4 B/weight more)."""
        return self._dense

    def sparse_forward(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat @ W.T`` on the kernel, for 2-D ``flat`` (no bias)."""
        module = native()
        if module is None:  # only reachable by constructing SparseLinear directly where the build failed
            raise SeftkitError("native sparse kernels are not available on this machine")
        buffers = self._buffers  # read directly: nn.Module's attribute fallback costs ~1 us a tensor per call
        return module.bitmap_matmul(flat, buffers["values"], buffers["bits"], buffers["row_ptr"], self.in_features,
                                    int(self.isa))

    def dense_forward(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat @ W.T`` with dense torch on the weight rebuilt from the packed form (no bias)."""
        if self._dense is None:
            self._dense = self.packed.to_dense()
        weight = self._dense if self._dense.dtype == flat.dtype else self._dense.to(flat.dtype)
        return F.linear(flat, weight)

    def _runs_sparse(self, rows: int, x_dtype: torch.dtype) -> bool:
        if self.choice is None:
            return True
        local = (rows, x_dtype, torch.get_num_threads())
        decided = self._uses_sparse.get(local)
        if decided is None:
            decided = self._uses_sparse[local] = self.choice.use_sparse(self, rows, x_dtype)
            if decided:
                if not self._dense_buckets:
                    self._dense = None  # built only to time dense: the packed form is all this layer needs
            else:
                self._dense_buckets.add(bucket(rows))
        return decided

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # checked here, not only in the kernel: reshape would otherwise fold a wrong width into other rows, and
        # an error raised in C++ must cross the extension boundary (which crashed one GPU image's build)
        if x.shape[-1] != self.in_features or not x.is_cpu:
            raise ValueError(f"SparseLinear takes CPU inputs of width {self.in_features}, got {tuple(x.shape)} "
                             f"on {x.device}")
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        y = self.sparse_forward(flat) if self._runs_sparse(flat.shape[0], flat.dtype) else self.dense_forward(flat)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if x.dim() == 2 else y.view(x.shape[:-1] + (self.out_features,))

    def extra_repr(self) -> str:
        kind = f"{self.nm[0]}:{self.nm[1]}" if self.nm else "unstructured"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"{self.packed.bytes_per_weight:.3f} B/weight, isa={self.isa.name.lower()}")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _worth_packing(weight: torch.Tensor) -> bool:
    if weight.dtype not in KERNEL_DTYPES:
        return False
    density = float(weight.ne(0).float().mean())
    sparse_bytes = density * weight.element_size() + 1 / 8
    return sparse_bytes <= AUTO_MAX_BYTE_RATIO * dense_bytes_per_weight(weight.dtype)


def sparsify_model(model: nn.Module, backend: str = "auto", nm: tuple[int, int] = (2, 4),
                   rule: TargetRule | None = None, isa: Isa | None = None, dense_fallback: bool = True,
                   choice: KernelChoice | None = None) -> nn.Module:
    """Swap the targeted linears for sparse kernels, in place; returns ``model``.

    ``auto``: CUDA 2:4 when the model is on a GPU that supports it, else the CPU kernels for every fp32/bf16
    layer that is N:M (``nm``) or sparse enough to stream fewer bytes. ``nm`` requires every targeted layer to be
    ``nm`` sparse; ``unstructured`` packs every targeted layer; ``dense`` changes nothing; ``cuda24`` uses
    PyTorch's semi-structured kernels (see :mod:`seftkit.kernels.cuda24`). ``dense_fallback`` and ``choice``
    go to every :class:`SparseLinear`: by default each layer runs dense for the batch sizes where that was faster.
    """
    if backend not in BACKENDS:
        raise SeftkitError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    linears = target_linears(model, rule)
    on_cuda = any(p.is_cuda for p in model.parameters())
    if backend == "dense" or not linears:
        return model
    if backend == "cuda24" or (backend == "auto" and on_cuda):
        from seftkit.kernels.cuda24 import sparsify_cuda24

        return sparsify_cuda24(model, linears)
    if on_cuda:
        raise SeftkitError(f"backend {backend!r} runs on CPU; move the model to CPU or use backend 'cuda24'")
    if backend == "nm":
        for name, module in linears.items():
            if not nm_valid(linear_weight(module), *nm):
                raise SeftkitError(f"{name} is not {nm[0]}:{nm[1]} sparse; use backend 'unstructured'")
    if native() is None:
        warnings.warn("seftkit: sparse kernels unavailable; the model stays dense", RuntimeWarning, stacklevel=2)
        return model
    chosen_isa = kernel_isa(isa)
    swapped = 0
    for name, module in linears.items():
        weight = linear_weight(module).detach()
        if backend == "auto" and not _worth_packing(weight):
            continue
        layer_nm = nm if backend == "nm" or (backend == "auto" and nm_valid(weight, *nm)) else None
        _set_module(model, name, SparseLinear.from_linear(module, layer_nm, chosen_isa, dense_fallback, choice))
        swapped += 1
    log.debug("sparsify_model: %d of %d linears on %s kernels", swapped, len(linears), chosen_isa.name.lower())
    return model
