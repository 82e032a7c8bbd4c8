"""compressed-tensors sparse checkpoints (``sparse-bitmask``, ``sparse-24-bitmask``) as written by <= 0.12.

Current runtimes do not load these: vLLM 0.19 removed its 2:4 sparse support and rejects sparsity configs, and
compressed-tensors 0.20 removed the sparse compressors; seftkit's :func:`load_model` (and compressed-tensors
0.12.2) read them. compressed-tensors 0.20 still defines these formats (``BitmaskConfig``,
``Sparse24BitMaskConfig``, the ``pack_bitmasks`` bit order) but dropped the compressors that wrote and read them,
so this module writes the tensors exactly as the library's ``BitmaskCompressor`` / ``Sparse24BitMaskCompressor``
did (byte-identical to 0.12.2, which also decompresses these exports exactly), using the library's own config
classes and bit packing. Per targeted module ``<m>`` (weight as stored by HF):

- ``sparse-bitmask``: ``<m>.shape`` (int64 [2]), ``<m>.compressed`` (the non-zeros, row-major),
  ``<m>.bitmask`` (uint8 [rows, ceil(cols/8)], little bit order), ``<m>.row_offsets`` (int64 [rows]).
- ``sparse-24-bitmask`` (every weight valid 2:4 along its stored rows): ``<m>.shape`` (int64 [2, 1]),
  ``<m>.compressed`` ([rows, cols/2], 2 values per group of 4) and ``<m>.bitmask`` (exactly 2 bits per group).

``config.json`` gets ``quantization_config`` with ``quant_method: compressed-tensors`` and the sparsity config
listing the compressed modules by name.
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
)
from seftkit.sparsity.masks import nm_valid
from seftkit.sparsity.targets import TargetRule

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from seftkit.exporters.registry import ExportOptions

WEIGHTS_NAME = "model.safetensors"
BITMASK, SPARSE24 = "sparse-bitmask", "sparse-24-bitmask"
_PARTS = {BITMASK: ("shape", "compressed", "bitmask", "row_offsets"), SPARSE24: ("shape", "compressed", "bitmask")}


def choose_format(stored: dict[str, torch.Tensor]) -> str:
    """``sparse-24-bitmask`` when every weight is 2:4 along its stored rows, else ``sparse-bitmask``."""
    fits = all(t.shape[1] % 4 == 0 and nm_valid(t, 2, 4) for t in stored.values())
    return SPARSE24 if stored and fits else BITMASK


def bitmask_parts(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    import torch
    from compressed_tensors.utils import pack_bitmasks

    keep = weight != 0
    counts = keep.sum(dim=-1)
    return {"shape": torch.tensor(list(weight.shape)), "compressed": weight[keep].contiguous(),
            "bitmask": pack_bitmasks(keep), "row_offsets": torch.cumsum(counts, 0) - counts}


def sparse24_parts(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exactly 2 kept entries per group of 4: the non-zeros, then the first zeros (as the kernels require)."""
    import torch
    from compressed_tensors.utils import pack_bitmasks

    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 4, 4)
    chosen = torch.argsort((groups == 0).to(torch.int8), dim=2, stable=True)[..., :2]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, chosen, True).reshape(rows, cols)
    return {"shape": torch.tensor([rows, cols]).reshape(-1, 1),
            "compressed": weight[keep].reshape(rows, cols // 2).contiguous(), "bitmask": pack_bitmasks(keep)}


def decompress_parts(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Dense weight from either format (both scatter the values into the unpacked bitmask, row-major)."""
    import torch
    from compressed_tensors.utils import unpack_bitmasks

    shape = parts["shape"].flatten().tolist()
    dense = torch.zeros(shape, dtype=parts["compressed"].dtype)
    dense[unpack_bitmasks(parts["bitmask"], shape)] = parts["compressed"].flatten()
    return dense


def write(model: PreTrainedModel, folder: Path, rule: TargetRule | None = None) -> str:
    """Write ``model.safetensors`` and the ``quantization_config``; returns the format chosen."""
    import compressed_tensors
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
    from safetensors.torch import save_file

    tensors, _ = unique_state_dict(model)
    targets = target_weights(model, rule)
    stored = {name: tensors[name].contiguous() for name in targets if name in tensors}
    fmt = choose_format(stored)
    encode = sparse24_parts if fmt == SPARSE24 else bitmask_parts
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name not in stored:
            out[name] = tensor.contiguous()
            continue
        module = name.removesuffix(".weight")
        out.update({f"{module}.{part}": value for part, value in encode(stored[name]).items()})
    save_file(out, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    numel = sum(t.numel() for t in stored.values())
    zeros = sum(int((t == 0).sum()) for t in stored.values())
    config_cls = Sparse24BitMaskConfig if fmt == SPARSE24 else BitmaskConfig
    sparsity = config_cls(targets=sorted(name.removesuffix(".weight") for name in stored), ignore=[],
                          global_sparsity=zeros / numel if numel else 0.0,
                          sparsity_structure="2:4" if fmt == SPARSE24 else "unstructured")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
                                     "sparsity_config": sparsity.model_dump(), "transform_config": {}}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return fmt


def export(model: PreTrainedModel, folder: Path, report: ExportReport, rule: TargetRule | None,
           options: ExportOptions) -> None:
    """The registry's entry point: write, record the format chosen and who can read it."""
    report.layout = write(model, folder, rule)
    report.notes.append(reader_note())


def reader_note() -> str:
    """Who reads the checkpoint: current runtimes do not; which reader the installed library is."""
    import compressed_tensors

    runtimes = ("vLLM >= 0.19 and compressed-tensors >= 0.20 do not load sparse compressed-tensors checkpoints; "
                "read it with seftkit.exporters.compressed.load_model or compressed-tensors <= 0.12 (checked: 0.12.2)")
    try:
        from compressed_tensors.compressors import BitmaskCompressor  # noqa: F401  (0.12.2 has it, 0.20 not)
    except ImportError:
        return f"{runtimes}; the installed compressed-tensors {compressed_tensors.__version__} cannot"
    return f"{runtimes}; the installed compressed-tensors {compressed_tensors.__version__} can"


def sparsity_config(folder: str | Path) -> dict:
    """The checkpoint's sparsity config, validated by the library's own config registry."""
    from compressed_tensors.config import SparsityCompressionConfig

    config_path = Path(folder) / "config.json"
    quant = json.loads(config_path.read_text()).get("quantization_config", {}) if config_path.is_file() else {}
    raw = quant.get("sparsity_config") or {}
    if quant.get("quant_method") != "compressed-tensors" or raw.get("format") not in _PARTS:
        raise SeftkitError(f"{folder} is not a compressed-tensors sparse checkpoint")
    return SparsityCompressionConfig.load_from_registry(raw["format"], **raw).model_dump()


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Decompress every weight of the checkpoint (HF names and orientation, stored dtype)."""
    from safetensors import safe_open

    fmt = sparsity_config(folder)["format"]
    with safe_open(str(Path(folder) / WEIGHTS_NAME), framework="pt") as handle:
        names = list(handle.keys())
        modules = {name.rsplit(".", 1)[0] for name in names if name.endswith(".bitmask")}
        tensors = {}
        for module in modules:
            parts = {part: handle.get_tensor(f"{module}.{part}") for part in _PARTS[fmt]}
            tensors[f"{module}.weight"] = decompress_parts(parts)
        compressed_keys = {f"{module}.{part}" for module in modules for part in _PARTS[fmt]}
        tensors.update({name: handle.get_tensor(name) for name in names if name not in compressed_keys})
    return tensors


def load_model(folder: str | Path) -> PreTrainedModel:
    """The HF model of a compressed-tensors export with the decompressed weights (tied weights re-tied)."""
    return model_from_tensors(Path(folder), load_state_dict(folder))


def verify(model: PreTrainedModel, folder: Path, report: ExportReport, rule: TargetRule | None = None) -> None:
    """Decompress the checkpoint and load it; every tensor must equal the model's."""
    mismatched, compared = reload_mismatches(model, folder, load_model, report)
    if mismatched:
        raise RuntimeError(f"compressed-tensors export does not decompress exactly: {mismatched[:3]}")
    report.parity.update({"tensors_equal": compared, "max_abs_diff": 0.0})
