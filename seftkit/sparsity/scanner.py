"""Read safetensors checkpoints tensor by tensor with numpy alone (no torch, no model).

``seftkit verify`` runs in CI jobs that install seftkit without torch, so this module parses the format
itself: an 8-byte little-endian header length, a JSON header mapping each tensor name to its dtype, shape
and ``data_offsets`` (relative to the end of the header), then the raw bytes. Every header is validated
before any tensor is read (offsets in range, sizes equal to dtype x shape, no overlaps), so a truncated or
corrupt file is reported as bad input instead of producing wrong counts.

Tensors are memory-mapped and viewed as unsigned integers of their item size; zeros are found on the bits,
which is exact for every dtype (including bf16 and fp8, which numpy cannot represent as floats): a float
is zero iff every bit except the sign bit is zero, so ``-0.0`` counts as zero; an integer is zero iff all
its bits are.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seftkit.errors import SeftkitError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The reference implementation refuses headers above 100 MB; a larger length means a damaged file.
_MAX_HEADER = 100 * 1024 * 1024
# numpy indexes with int64: a larger dimension cannot be viewed (and no real tensor comes near it).
_MAX_DIM = 2**63


@dataclass(frozen=True)
class DType:
    """How to find zeros in one safetensors dtype: item size and the bits that must all be zero."""

    itemsize: int
    value_bits: int  # all bits for integers, every bit but the sign bit for floats

    @property
    def raw(self) -> np.dtype:
        """The unsigned integer type the raw bytes are viewed as."""
        return np.dtype(f"<u{self.itemsize}")


def _float(itemsize: int) -> DType:
    return DType(itemsize, (1 << (8 * itemsize - 1)) - 1)


def _int(itemsize: int) -> DType:
    return DType(itemsize, (1 << (8 * itemsize)) - 1)


DTYPES: dict[str, DType] = {
    "F64": _float(8), "F32": _float(4), "F16": _float(2), "BF16": _float(2),
    "F8_E4M3": _float(1), "F8_E5M2": _float(1),
    "I64": _int(8), "U64": _int(8), "I32": _int(4), "U32": _int(4),
    "I16": _int(2), "U16": _int(2), "I8": _int(1), "U8": _int(1), "BOOL": _int(1),
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live. ``offset`` is absolute within ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _corrupt(path: Path, why: str) -> SeftkitError:
    return SeftkitError(f"corrupt or truncated safetensors {path}: {why}")


def load_json(raw: bytes | str) -> object:
    """Parse untrusted JSON; ``None`` when it is not JSON (deep nesting and giant integers included)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8 and the int-digits limit are ValueErrors
        return None


def _is_index(value: object) -> bool:
    """A non-negative int that is not a bool (``True`` is an int in Python, never a dimension)."""
    return type(value) is int and value >= 0


def read_header(path: str | os.PathLike) -> list[TensorInfo]:
    """Parse and validate one safetensors file's header (reads only the header bytes)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"file is {size} bytes, too short for a header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise _corrupt(path, f"header length {header_len} exceeds the file size {size}")
            raw_header = f.read(header_len)
    except OSError as exc:
        raise SeftkitError(f"cannot read {path}: {exc.strerror}") from None
    header = load_json(raw_header)
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object" if header is not None else "header is not valid JSON")
    data_start = 8 + header_len
    data_size = size - data_start
    tensors = [_tensor_info(path, name, entry, data_start, data_size)
               for name, entry in header.items() if name != "__metadata__"]
    _check_no_overlap(path, tensors)
    return tensors


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _corrupt(path, f"entry for {name} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_index(d) and d < _MAX_DIM for d in shape)):
        raise _corrupt(path, f"{name} has an invalid shape {_short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _corrupt(path, f"{name} has invalid data_offsets {_short(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _corrupt(path, f"{name} spans bytes {begin}..{end} but the data section has {data_size}")
    if not isinstance(dtype, str):
        raise _corrupt(path, f"{name} has an invalid dtype {_short(dtype)}")
    if dtype in DTYPES:
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise _corrupt(path, f"{name} has {end - begin} bytes; {dtype} x {_short(shape)} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_no_overlap(path: Path, tensors: list[TensorInfo]) -> None:
    ordered = sorted((t for t in tensors if t.nbytes), key=lambda t: t.offset)
    for before, after in itertools.pairwise(ordered):
        if after.offset < before.offset + before.nbytes:
            raise _corrupt(path, f"{before.name} and {after.name} overlap")


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model folder, in the order transformers would pick them.

    ``model.safetensors`` first, then the shards named by ``model.safetensors.index.json``, then (for
    non-standard names) every ``*.safetensors`` in the folder.
    """
    folder = Path(folder)
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    index = folder / INDEX_FILE
    if index.is_file():
        return _index_shards(folder, index)
    return sorted(folder.glob("*.safetensors"))


def _index_shards(folder: Path, index: Path) -> list[Path]:
    try:
        data = load_json(index.read_bytes())
    except OSError as exc:
        raise SeftkitError(f"cannot read {index}: {exc.strerror}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
        raise SeftkitError(f"{index} is not a valid safetensors index (no weight_map of file names)")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        # judged by name, not by resolving: the Hugging Face cache links shards to blobs outside the folder
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise SeftkitError(f"shard {shard} listed in {index} is outside the model folder")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise SeftkitError(f"shard {missing[0]} listed in {index} is missing")
    return [folder / s for s in shards]


def read_checkpoint(files: list[Path]) -> list[TensorInfo]:
    """Validated headers of every file; a tensor stored in two files is corruption, not a choice."""
    seen: dict[str, Path] = {}
    tensors = []
    for path in files:
        for info in read_header(path):
            if info.name in seen:
                raise _corrupt(path, f"{info.name} is also stored in {seen[info.name].name}")
            seen[info.name] = path
            tensors.append(info)
    return tensors


def raw_dtype(info: TensorInfo) -> np.dtype:
    """The unsigned integer type ``info``'s bytes are viewed as; bad input for a dtype verify cannot read."""
    if info.dtype not in DTYPES:
        raise SeftkitError(f"{info.name} has dtype {info.dtype}, which verify cannot read")
    return DTYPES[info.dtype].raw


class MappedFiles:
    """Memory maps opened on demand and shared by every tensor of a scan, so each file is mapped once.

    Maps are released when the last array viewing them is dropped (numpy refuses to close a map early).
    """

    def __init__(self) -> None:
        self._maps: dict[Path, np.memmap] = {}

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as unsigned integers of its item size, shaped like the tensor (no copy)."""
        dtype = raw_dtype(info)
        if not info.nbytes:
            return np.zeros(info.shape, dtype=dtype)
        if info.file not in self._maps:
            self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        data = self._maps[info.file][info.offset : info.offset + info.nbytes]
        return data.view(dtype).reshape(info.shape)


def zero_mask(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Bool array, True where the value is zero (``-0.0`` included), from the raw bits of ``dtype``."""
    bits = DTYPES[dtype].value_bits
    if bits == (1 << (8 * raw.itemsize)) - 1:
        return raw == 0
    return (raw & raw.dtype.type(bits)) == 0


def row_blocks(rows: int, cols: int, multiple: int = 1, budget: int = 1 << 22) -> Iterator[slice]:
    """Row slices of about ``budget`` elements (a multiple of ``multiple`` rows), to bound temporaries."""
    step = max(multiple, (budget // max(cols, 1)) // multiple * multiple)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))
