"""What every exporter shares: the report, the weights to export, side files, and rebuilding a model.

Each exporter writes into a temp folder (``seftkit.io.atomic_dir``), reads its own output back with the tool
that format is meant for, and fills an :class:`ExportReport` with the sizes and parity it measured there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from seftkit.models import linear_weight, target_linears
from seftkit.sparsity.targets import TargetRule

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

REPORT_NAME = "export_report.json"


@dataclass
class ExportReport:
    """Sizes, timings and the read-back proof of one export (``--json`` and ``export_report.json``)."""

    format: str
    layout: str
    model: str
    out: str
    dtype: str
    targets: int = 0
    sparsity: float = 0.0
    dense_bytes: int = 0
    export_bytes: int = 0
    size_ratio: float = 0.0
    export_seconds: float = 0.0
    load_seconds: float = 0.0
    parity: dict[str, float | bool | int | str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def set_sizes(self, dense: int, export: int) -> None:
        """``size_ratio`` is export over the same tensors stored dense in the same dtype (< 1 saves space)."""
        self.dense_bytes, self.export_bytes = dense, export
        self.size_ratio = export / dense if dense else 0.0


def warn(report: ExportReport, message: str) -> None:
    """A warning the user sees on stderr now and finds in the report later."""
    log.warning("warning: %s", message)
    report.notes.append(message)


@dataclass(frozen=True)
class TargetWeight:
    """A targeted linear weight: its parameter name, its [out, in] view, and whether it is stored [in, out]."""

    name: str
    matrix: torch.Tensor
    transposed: bool


def target_weights(model: PreTrainedModel, rule: TargetRule | None = None) -> dict[str, TargetWeight]:
    """The weights an export stores sparse, keyed by parameter name (the same selection prune/verify use)."""
    found = {}
    for module_name, module in target_linears(model, rule).items():
        name = f"{module_name}.weight"
        found[name] = TargetWeight(name, linear_weight(module), type(module).__name__ == "Conv1D")
    return found


def unique_state_dict(model: PreTrainedModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict without tied duplicates (safetensors refuses shared storage) and the ``tied -> kept`` map."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach()
    return tensors, tied


def dense_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes the tensors take stored dense (what a plain safetensors file of them holds, less its header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def sparsity_of(weights: dict[str, TargetWeight]) -> float:
    total = sum(w.matrix.numel() for w in weights.values())
    zeros = sum(int((w.matrix == 0).sum()) for w in weights.values())
    return zeros / total if total else 0.0


def format_files_bytes(folder: Path, side_files: set[str]) -> int:
    """Bytes of what the format wrote (weights, manifest, graph): every file but the side files and the report."""
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and p.name not in side_files and p.name != REPORT_NAME)


def save_side_files(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, folder: Path) -> set[str]:
    """Config (with the exported dtype), generation config and tokenizer, so the export is self-contained.

    Returns the names written, so sizes count only what the format itself adds."""
    model.config.save_pretrained(folder)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return {p.name for p in folder.iterdir()}


def reload_mismatches(
    model: PreTrainedModel, folder: Path, loader: Callable[[Path], PreTrainedModel], report: ExportReport
) -> tuple[list[str], int]:
    """Load the export back with ``loader`` (timed into ``report``); the names of tensors that differ from the
    model's, and how many were compared."""
    import torch

    start = time.perf_counter()
    loaded = loader(folder)
    report.load_seconds = time.perf_counter() - start
    expected, _ = unique_state_dict(model)
    got = loaded.state_dict()
    return [name for name, tensor in expected.items() if not torch.equal(tensor, got[name])], len(expected)


def model_from_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> PreTrainedModel:
    """The folder's HF model holding exactly ``tensors`` (in their dtype when they share one, else fp32)."""
    import torch

    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    model = empty_model(folder, dtypes.pop() if len(dtypes) == 1 else torch.float32)
    load_into(model, tensors)
    return model


def empty_model(folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The model class of ``folder``'s config with uninitialised weights (they are all overwritten next)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(folder)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped under no_init_weights; tied copies are not stored in an export
    return model.eval()


def load_into(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> None:
    """Load a full state dict; anything missing other than the model's tied copies, or anything extra, means the
    export does not belong to this config."""
    from seftkit.errors import SeftkitError

    _, tied = unique_state_dict(model)
    result = model.load_state_dict(tensors, strict=False)
    missing = sorted(set(result.missing_keys) - set(tied))
    if missing or result.unexpected_keys:
        kind, name = ("missing", missing[0]) if missing else ("unexpected", sorted(result.unexpected_keys)[0])
        raise SeftkitError(f"export does not match its model config: {kind} tensor {name}")
