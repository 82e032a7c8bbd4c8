"""Compressed weight layouts the native kernels read, with exact pack/unpack in plain torch.

One layout serves unstructured and N:M sparsity ("bitmap"): a keep-bit per weight (int32 words, bit j of
word w is column 32*w + j), the kept values packed row by row in column order, and each row's offset into
the values. Bytes per weight = density * value size + 1/8 (+ 8 bytes per row):

- 70% unstructured, bf16: 0.3 * 2 + 0.125 = 0.725 B/weight, ceiling 2.76x over dense bf16 (2 B/weight).
- 2:4, bf16: 0.5 * 2 + 0.125 = 1.125 B/weight, ceiling 1.78x. For 2:4 the 4-bit group mask is exactly the
  2x2-bit in-group position code, and for every N:M with at least half kept it is no larger, so N:M needs
  no second layout; :func:`pack_nm` only checks the pattern and records it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seftkit.errors import SeftkitError
from seftkit.sparsity.masks import nm_valid

WORD_BITS = 32
VALUE_PAD = 32  # zeros after the last value: the AVX2 path loads 8 values at a time past a row's end
_PACK_ROWS = 1024  # rows packed per step, to bound temporaries on 11008-row matrices
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(WORD_BITS)], dtype=torch.int64)


@dataclass
class BitmapWeight:
    """A sparse [out, in] weight: ``values`` (kept, row-major, padded), ``bits`` [out, words], ``row_ptr``."""

    values: torch.Tensor
    bits: torch.Tensor
    row_ptr: torch.Tensor
    shape: tuple[int, int]
    nm: tuple[int, int] | None = None

    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

    @property
    def nbytes(self) -> int:
        """Bytes the kernel streams per call (padding included)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.bits, self.row_ptr))

    @property
    def bytes_per_weight(self) -> float:
        return self.nbytes / (self.shape[0] * self.shape[1])

    def clone(self) -> BitmapWeight:
        return BitmapWeight(self.values.clone(), self.bits.clone(), self.row_ptr.clone(), self.shape, self.nm)

    def to_dense(self) -> torch.Tensor:
        """The exact dense weight (zeros where bits are clear)."""
        rows, cols = self.shape
        dense = torch.zeros(rows, self.bits.shape[1] * WORD_BITS, dtype=self.values.dtype)
        dense[_unpack_bits(self.bits)] = self.values[: self.nnz]
        return dense[:, :cols].contiguous()


def _unpack_bits(bits: torch.Tensor) -> torch.Tensor:
    return (bits.to(torch.int64).unsqueeze(-1) & _BIT_WEIGHTS).ne(0).reshape(bits.shape[0], -1)


def _pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """Bool [rows, words*32] -> int32 [rows, words] (two's complement for bit 31)."""
    words = (keep.reshape(keep.shape[0], -1, WORD_BITS).to(torch.int64) * _BIT_WEIGHTS).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_bitmap(weight: torch.Tensor, nm: tuple[int, int] | None = None) -> BitmapWeight:
    """Pack a float32 or bfloat16 [out, in] weight; every zero is dropped."""
    if weight.dim() != 2:
        raise SeftkitError(f"can only pack 2-D weights, got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.bfloat16):
        raise SeftkitError(f"sparse kernels take float32 or bfloat16 weights, got {weight.dtype}")
    weight = weight.detach().cpu().contiguous()
    rows, cols = weight.shape
    words = -(-cols // WORD_BITS)
    keep = weight.ne(0)
    bits = torch.cat([
        _pack_bits(torch.nn.functional.pad(keep[start:start + _PACK_ROWS], (0, words * WORD_BITS - cols)))
        for start in range(0, rows, _PACK_ROWS)
    ]) if rows else torch.zeros(0, words, dtype=torch.int32)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(keep.sum(1), 0, out=row_ptr[1:])
    values = torch.cat([weight[keep], torch.zeros(VALUE_PAD, dtype=weight.dtype)])
    return BitmapWeight(values, bits, row_ptr, (rows, cols), nm)


def pack_nm(weight: torch.Tensor, n: int, m: int) -> BitmapWeight:
    """Pack a weight that has at least ``n`` zeros in every ``m`` consecutive inputs of each row."""
    if not nm_valid(weight, n, m):
        raise SeftkitError(f"weight {tuple(weight.shape)} is not {n}:{m} sparse")
    return pack_bitmap(weight, nm=(n, m))


def dense_bytes_per_weight(dtype: torch.dtype) -> float:
    return float(torch.empty(0, dtype=dtype).element_size())
