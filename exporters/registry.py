"""The export formats: one entry per format (its module, what it is, which options and dtypes it takes).

``seftkit export``'s choices and help, the option checks and ``bench/export_sizes.py`` all read this table, so a
new format is one entry here plus its module. A format module provides
``export(model, folder, report, rule, options)`` (write into ``folder``, set ``report.layout``) and
``verify(model, folder, report, rule)`` (read the files back with the format's own reader; raise if they differ:
an exact format that does not read back exactly is a bug, RuntimeError, exit 3; ONNX's logit check compares two
runtimes within a tolerance, and missing it is a property of the model on that runtime, SeftkitError, exit 2).
Nothing here imports torch: ``seftkit export --help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from seftkit.errors import SeftkitError


@dataclass(frozen=True)
class ExportOptions:
    """Format-specific options; each format lists the ones it takes (``ExportFormat.options``)."""

    opset: int | None = None
    sparse_initializers: bool = False
    nm_layout: bool = False

    def given(self) -> list[str]:
        """The options set away from their defaults, as CLI flags."""
        return [f"--{f.name.replace('_', '-')}" for f in fields(self) if getattr(self, f.name) != f.default]


@dataclass(frozen=True)
class BenchVariant:
    """One row kind of ``bench/export_sizes.py``: these options, on the pruned copies ``applies`` accepts."""

    name: str
    options: ExportOptions = ExportOptions()
    applies: Callable[[float | None, str | None], bool] = lambda sparsity, nm: True


@dataclass(frozen=True)
class ExportFormat:
    name: str
    module: str  # under seftkit.exporters, imported when the format is used
    description: str  # one line: what the files are and who reads them
    options: tuple[str, ...] = ()  # ExportOptions fields this format takes
    dtypes: tuple[str, ...] | None = None  # the dtypes it can write (None: any); "auto" means the first
    # whether the format stores the weights sparse (so an export not smaller than dense deserves a warning)
    stores_sparse: Callable[[ExportOptions], bool] = lambda options: True
    weight_copies: int = 1  # files that each hold every weight (ONNX: two graphs); sizes compare per copy
    bench: tuple[BenchVariant, ...] = ()

    def load_dtype(self, dtype: str) -> str:
        """The dtype to load the model in: ``auto`` keeps the checkpoint's, unless the format writes fewer."""
        return self.dtypes[0] if dtype == "auto" and self.dtypes else dtype

    def check(self, dtype: str, options: ExportOptions) -> None:
        """Refuse options and dtypes this format does not take (before any model is loaded)."""
        from seftkit.models import resolve_dtype

        for flag in options.given():
            if flag.removeprefix("--").replace("-", "_") not in self.options:
                takers = [f.name for f in FORMATS.values() if flag.removeprefix("--").replace("-", "_") in f.options]
                raise SeftkitError(f"{flag} applies to --format {' or '.join(takers)} only")
        wanted = resolve_dtype(dtype)
        if self.dtypes and wanted is not None and wanted not in {resolve_dtype(d) for d in self.dtypes}:
            raise SeftkitError(f"--format {self.name} writes {' or '.join(self.dtypes)} only, not {dtype}")
        if options.opset is not None and options.opset < 18:
            raise SeftkitError(f"--opset {options.opset} is too old for the torch exporter; use 18 or newer")


FORMATS: dict[str, ExportFormat] = {
    entry.name: entry
    for entry in (
        ExportFormat(
            "hf", "hf",
            "a plain Hugging Face folder (safetensors, zeros stored dense) in the chosen dtype with a manifest of "
            "per-layer sparsity and file hashes: what vLLM, llama.cpp's converter and lm-eval load",
            stores_sparse=lambda options: False, bench=(BenchVariant("hf"),)),
        ExportFormat(
            "csr", "csr",
            "CSR (crow/col/values) in safetensors with a manifest; scipy and torch read every matrix",
            options=("nm_layout",),
            bench=(BenchVariant("csr"),
                   BenchVariant("csr+nm24", ExportOptions(nm_layout=True), lambda sparsity, nm: nm == "2:4"))),
        ExportFormat(
            "compressed", "compressed",
            "compressed-tensors sparse-bitmask / sparse-24-bitmask as written by compressed-tensors <= 0.12; "
            "current runtimes (vLLM >= 0.19, compressed-tensors >= 0.20) do not load it",
            bench=(BenchVariant("compressed"),)),
        ExportFormat(
            "onnx", "onnx",
            "a logits graph (model.onnx) and a decoder with a KV cache in Optimum / onnxruntime-genai names "
            "(model_with_past.onnx), fp32",
            options=("opset", "sparse_initializers"), dtypes=("fp32",),
            stores_sparse=lambda options: options.sparse_initializers, weight_copies=2,
            bench=(BenchVariant("onnx"),
                   BenchVariant("onnx+sparse-init", ExportOptions(sparse_initializers=True),
                                lambda sparsity, nm: sparsity is not None and sparsity > 2 / 3))),
    )
}


def get_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise SeftkitError(f"unknown export format {name!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS[name]
