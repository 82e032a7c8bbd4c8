"""Sparse inference kernels: native CPU kernels (bitmap-packed, unstructured and N:M) and CUDA 2:4.

``sparsify_model(model, backend=...)`` swaps a model's linears for :class:`SparseLinear` so that
``generate()`` runs on the kernels; ``seftkit bench`` measures what that buys on this machine.
"""

from seftkit.kernels.build import Isa, kernel_isa, native
from seftkit.kernels.dispatch import KernelChoice
from seftkit.kernels.formats import BitmapWeight, pack_bitmap, pack_nm
from seftkit.kernels.sparse_linear import BACKENDS, SparseLinear, sparsify_model

__all__ = ["BACKENDS", "BitmapWeight", "Isa", "KernelChoice", "SparseLinear", "kernel_isa", "native", "pack_bitmap",
           "pack_nm", "sparsify_model"]
