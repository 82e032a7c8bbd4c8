"""A plain Hugging Face folder in the chosen dtype, with a manifest that proves what it holds.

The weights are ordinary dense safetensors (the zeros stored as zeros), which is what vLLM, llama.cpp's
``convert_hf_to_gguf.py`` and lm-eval load today; ``hf_manifest.json`` lists every targeted weight's shape,
non-zeros and sparsity and the sha256 of every file, so whoever receives the folder can check it without
seftkit (``sha256sum``) and ``seftkit verify`` still reads the sparsity from the weights themselves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from seftkit.exporters.common import REPORT_NAME, ExportReport, reload_mismatches, target_weights
from seftkit.io import write_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from seftkit.exporters.registry import ExportOptions
    from seftkit.sparsity.targets import TargetRule

FORMAT = "seftkit-hf"
VERSION = 1
MANIFEST_NAME = "hf_manifest.json"
_CHUNK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def layer_stats(model: PreTrainedModel, rule: TargetRule | None = None) -> dict[str, dict]:
    """Shape ([out, in]), non-zeros and sparsity of every targeted weight, by parameter name."""
    stats = {}
    for name, target in target_weights(model, rule).items():
        nnz = int(target.matrix.count_nonzero())
        stats[name] = {"shape": list(target.matrix.shape), "nnz": nnz,
                       "sparsity": 1 - nnz / target.matrix.numel()}
    return stats


def export(model: PreTrainedModel, folder: Path, report: ExportReport, rule: TargetRule | None,
           options: ExportOptions) -> None:
    """Save the model as safetensors in its (chosen) dtype, then the manifest over every file written."""
    from seftkit.models import save_model

    save_model(model, None, folder)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name not in (MANIFEST_NAME, REPORT_NAME)}
    write_json(folder / MANIFEST_NAME, {"format": FORMAT, "version": VERSION, "dtype": report.dtype,
                                        "sparsity": report.sparsity, "layers": layer_stats(model, rule),
                                        "files": files})
    report.layout = f"hf ({report.dtype} safetensors)"


def load_model(folder: str | Path) -> PreTrainedModel:
    """The folder as any HF user loads it: ``AutoModelForCausalLM`` in the stored dtype, nothing from seftkit."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()


def check_manifest(folder: str | Path) -> dict:
    """The manifest, after checking every file's size and hash against it; raises on the first that differs."""
    from seftkit.errors import SeftkitError

    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise SeftkitError(f"{path} does not match {MANIFEST_NAME} (missing, resized or changed)")
    return manifest


def verify(model: PreTrainedModel, folder: Path, report: ExportReport, rule: TargetRule | None = None) -> None:
    """Load the folder with plain transformers: every tensor equal and in the exported dtype; the manifest's
    hashes match the files and its per-layer counts the weights."""
    manifest = check_manifest(folder)
    loaded: list[PreTrainedModel] = []
    mismatched, compared = reload_mismatches(model, folder, lambda path: loaded.append(load_model(path)) or loaded[0],
                                             report)
    dtypes = {str(p.dtype).removeprefix("torch.") for p in loaded[0].parameters() if p.is_floating_point()}
    if mismatched or dtypes != {report.dtype} or manifest["layers"] != layer_stats(model, rule):
        raise RuntimeError(f"HF export does not read back exactly: tensors {mismatched[:3]}, dtypes {sorted(dtypes)}")
    report.parity.update({"tensors_equal": compared, "max_abs_diff": 0.0, "files_hashed": len(manifest["files"])})
