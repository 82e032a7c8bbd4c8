"""CSR in safetensors: the sparse weights as (crow_indices, col_indices, values), readable by scipy and torch.

Each targeted weight ``<name>`` becomes ``<name>.crow_indices``, ``<name>.col_indices`` and ``<name>.values``
of its [out, in] matrix (GPT-2's Conv1D is transposed into that orientation and back on load). Indices take
the narrowest integer type that holds them (int16 column indices for widths up to 32768), values keep the
model dtype. With ``nm_layout`` a weight that is valid 2:4 is stored instead as ``<name>.nm_values`` (the 2
kept values of every group of 4) and ``<name>.nm_positions`` (their 2-bit positions, 4 per byte): 0.53 of
the dense fp32 size against CSR's 0.75 (int16 columns) at 50% sparsity. Everything else (norms, embeddings)
is stored dense.
``csr_manifest.json`` says which layout each tensor has, its shape and dtypes, and which tensors are tied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from seftkit.errors import SeftkitError
from seftkit.exporters.common import (
    ExportReport,
    model_from_tensors,
    reload_mismatches,
    target_weights,
    unique_state_dict,
    warn,
)
from seftkit.io import write_json
from seftkit.sparsity.masks import nm_valid
from seftkit.sparsity.targets import TargetRule

if TYPE_CHECKING:
    import scipy.sparse
    import torch
    from transformers import PreTrainedModel

    from seftkit.exporters.registry import ExportOptions

FORMAT = "seftkit-csr"
VERSION = 1
WEIGHTS_NAME = "model.csr.safetensors"
MANIFEST_NAME = "csr_manifest.json"
CSR, NM24, DENSE = "csr", "nm24", "dense"


def index_dtype(largest: int) -> torch.dtype:
    """Narrowest signed integer type holding ``largest`` (signed: scipy and torch index with signed ints)."""
    import torch

    for dtype in (torch.int16, torch.int32):
        if largest <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def csr_parts(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """``crow_indices``, ``col_indices`` and ``values`` of a 2-D tensor's non-zeros, row-major."""
    import torch

    rows, cols = matrix.shape
    keep = matrix != 0
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(keep.sum(dim=1), dim=0)
    col = keep.nonzero()[:, 1]
    return {
        "crow_indices": crow.to(index_dtype(int(crow[-1]))),
        "col_indices": col.to(index_dtype(max(cols - 1, 0))),
        "values": matrix[keep].contiguous(),
    }


def csr_dense(parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    import torch

    crow = parts["crow_indices"].long()
    rows = torch.repeat_interleave(torch.arange(shape[0]), crow.diff())
    dense = torch.zeros(shape, dtype=parts["values"].dtype)
    dense[rows, parts["col_indices"].long()] = parts["values"]
    return dense


def nm24_fits(matrix: torch.Tensor) -> bool:
    """The 2:4 layout needs at least 2 zeros in every group of 4 and whole position bytes per row."""
    return matrix.shape[1] % 8 == 0 and nm_valid(matrix, 2, 4)


def nm24_parts(matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keep 2 entries per group of 4 (the non-zeros, then the first zeros) and pack their positions 4 per byte."""
    import torch

    rows, cols = matrix.shape
    groups = matrix.reshape(rows, cols // 4, 4)
    chosen = torch.argsort((groups == 0).to(torch.int8), dim=2, stable=True)[..., :2].sort(dim=2).values
    codes = chosen.reshape(rows, cols // 8, 4).to(torch.uint8)
    packed = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    return {"nm_values": groups.gather(2, chosen).reshape(rows, cols // 2).contiguous(), "nm_positions": packed}


def nm24_dense(parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    import torch

    rows, cols = shape
    packed = parts["nm_positions"]
    codes = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1).reshape(rows, cols // 4, 2)
    dense = torch.zeros(rows, cols // 4, 4, dtype=parts["nm_values"].dtype)
    dense.scatter_(2, codes.long(), parts["nm_values"].reshape(rows, cols // 4, 2))
    return dense.reshape(rows, cols)


_DECODERS = {CSR: csr_dense, NM24: nm24_dense}


def write(model: PreTrainedModel, folder: Path, rule: TargetRule | None = None, nm_layout: bool = False) -> dict:
    """Write the weights file and manifest into ``folder``; returns the manifest."""
    from safetensors.torch import save_file

    tensors, tied = unique_state_dict(model)
    targets = target_weights(model, rule)
    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, tensor in tensors.items():
        target = targets.get(name)
        if target is None:
            stored[name] = tensor.contiguous()
            entries[name] = {"layout": DENSE, "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype)}
            continue
        matrix = target.matrix.detach().contiguous()
        layout = NM24 if nm_layout and nm24_fits(matrix) else CSR
        parts = nm24_parts(matrix) if layout == NM24 else csr_parts(matrix)
        stored.update({f"{name}.{part}": value for part, value in parts.items()})
        entries[name] = {"layout": layout, "shape": list(matrix.shape), "dtype": _dtype_name(matrix.dtype),
                         "transposed": target.transposed, "nnz": int((matrix != 0).sum()),
                         "parts": {part: _dtype_name(value.dtype) for part, value in parts.items()}}
    manifest = {"format": FORMAT, "version": VERSION, "weights": WEIGHTS_NAME, "tensors": entries, "tied": tied}
    save_file(stored, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "seftkit": FORMAT})
    write_json(folder / MANIFEST_NAME, manifest)
    return manifest


def export(model: PreTrainedModel, folder: Path, report: ExportReport, rule: TargetRule | None,
           options: ExportOptions) -> None:
    """The registry's entry point: write, and say in the layout how many weights took the 2:4 layout."""
    manifest = write(model, folder, rule, nm_layout=options.nm_layout)
    if options.nm_layout:
        nm24 = sum(entry["layout"] == NM24 for entry in manifest["tensors"].values())
        report.layout = f"csr+nm24 ({nm24} of {report.targets} weights in the 2:4 layout)"
        if nm24 < report.targets:
            warn(report, f"{report.targets - nm24} targeted weights are not 2:4 (or their width is not a multiple "
                         "of 8) and were stored as CSR")


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise SeftkitError(f"{folder} is not a seftkit CSR export (no {MANIFEST_NAME})")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise SeftkitError(f"{path} is format {manifest.get('format')} v{manifest.get('version')}; "
                           f"this seftkit reads {FORMAT} v{VERSION}")
    return manifest


def _read_tensor(manifest: dict, name: str, handle) -> torch.Tensor:
    """One tensor in its stored orientation, densified from its layout."""
    entry = manifest["tensors"][name]
    if entry["layout"] == DENSE:
        return handle.get_tensor(name)
    parts = {part: handle.get_tensor(f"{name}.{part}") for part in entry["parts"]}
    matrix = _DECODERS[entry["layout"]](parts, tuple(entry["shape"]))
    return matrix.t().contiguous() if entry["transposed"] else matrix


def load_matrix(folder: str | Path, name: str) -> scipy.sparse.csr_matrix:
    """A sparse weight as a scipy CSR matrix in [out, in] orientation (bf16 values are widened to fp32)."""
    import numpy as np
    import scipy.sparse
    import torch
    from safetensors import safe_open

    manifest = read_manifest(folder)
    entry = manifest["tensors"].get(name)
    if entry is None or entry["layout"] == DENSE:
        raise SeftkitError(f"{name} is not a sparse weight of {folder}")
    with safe_open(str(Path(folder) / manifest["weights"]), framework="pt") as handle:
        parts = {part: handle.get_tensor(f"{name}.{part}") for part in entry["parts"]}
    shape = tuple(entry["shape"])
    if entry["layout"] == NM24:
        dense = nm24_dense(parts, shape)
        parts = csr_parts(dense)

    def as_numpy(tensor: torch.Tensor) -> np.ndarray:
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()

    return scipy.sparse.csr_matrix(
        (as_numpy(parts["values"]), as_numpy(parts["col_indices"]), as_numpy(parts["crow_indices"])), shape=shape)


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every stored tensor densified in its HF orientation (tied copies are not stored; the model re-ties them)."""
    from safetensors import safe_open

    manifest = read_manifest(folder)
    with safe_open(str(Path(folder) / manifest["weights"]), framework="pt") as handle:
        return {name: _read_tensor(manifest, name, handle) for name in manifest["tensors"]}


def load_model(folder: str | Path) -> PreTrainedModel:
    """The HF model of a CSR export, with exactly the exported weights (in eval mode, exported dtype)."""
    return model_from_tensors(Path(folder), load_state_dict(folder))


def verify(model: PreTrainedModel, folder: Path, report: ExportReport, rule: TargetRule | None = None) -> None:
    """Read the export back with torch (whole model) and scipy (every sparse matrix); both must be exact."""
    import numpy as np
    import torch

    mismatched, compared = reload_mismatches(model, folder, load_model, report)
    scipy_bad = []
    targets = target_weights(model, rule)
    for name, target in targets.items():
        reference = target.matrix.detach()
        reference = reference.float() if reference.dtype == torch.bfloat16 else reference
        if not np.array_equal(load_matrix(folder, name).toarray(), reference.numpy()):
            scipy_bad.append(name)
    if mismatched or scipy_bad:
        raise RuntimeError(f"CSR export does not read back exactly: {(mismatched + scipy_bad)[:3]}")
    report.parity.update({"tensors_equal": compared, "scipy_matrices_equal": len(targets),
                          "max_abs_diff": 0.0})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
