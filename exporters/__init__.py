"""Writers for sparse formats other tools read: CSR, compressed-tensors, ONNX.

:func:`export_model` is the one entry point (the ``seftkit export`` command calls it): it loads the model,
writes the chosen format into a temp folder, reads it back with that format's own tool (scipy, the
compressed-tensors layout, onnxruntime) and only then moves the folder into place, with its report.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from seftkit.errors import SeftkitError

if TYPE_CHECKING:
    from seftkit.exporters.common import ExportReport
    from seftkit.sparsity.targets import TargetRule

log = logging.getLogger(__name__)

FORMATS = ("csr", "compressed", "onnx")


def check_options(fmt: str, dtype: str, opset: int | None, sparse_initializers: bool, nm_layout: bool) -> None:
    """Refuse options that do not apply to the format before any model is loaded."""
    from seftkit.models import resolve_dtype

    if fmt not in FORMATS:
        raise SeftkitError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt != "onnx" and (opset is not None or sparse_initializers):
        raise SeftkitError("--opset and --sparse-initializers apply to --format onnx only")
    if fmt != "csr" and nm_layout:
        raise SeftkitError("--nm-layout applies to --format csr only")
    if fmt == "onnx" and dtype not in ("auto", "fp32", "float32"):
        raise SeftkitError("ONNX export is fp32 only (its parity with torch is checked at 1e-4)")
    resolve_dtype(dtype)
    if opset is not None and opset < 18:
        raise SeftkitError(f"--opset {opset} is too old for the torch exporter; use 18 or newer")


def export_model(
    model: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    dtype: str = "auto",
    opset: int | None = None,
    sparse_initializers: bool = False,
    nm_layout: bool = False,
    overwrite: bool = False,
    rule: TargetRule | None = None,
    progress: bool = False,
) -> ExportReport:
    """Export ``model`` as ``fmt`` into ``out`` (atomically), proven by reading it back; returns the report."""
    from tqdm import tqdm

    from seftkit.exporters import common
    from seftkit.io import atomic_dir, check_output_path, write_json
    from seftkit.models import check_finite, load_model, resolve_model_path

    check_options(fmt, dtype, opset, sparse_initializers, nm_layout)
    source = resolve_model_path(model)
    check_output_path(out, overwrite, inputs=(source,))
    with atomic_dir(out, overwrite) as tmp, tqdm(total=3, desc=f"export {fmt}", unit="step", leave=False,
                                                  disable=not progress) as stages:
        stages.set_postfix_str("load")
        lm, tokenizer = load_model(source, dtype="fp32" if fmt == "onnx" else dtype)
        check_finite(lm)
        targets = common.target_weights(lm, rule)
        tensors, _ = common.unique_state_dict(lm)
        weights_dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
        report = common.ExportReport(format=fmt, layout=fmt, model=str(model), out=str(out),
                                     dtype=str(weights_dtype).removeprefix("torch."),
                                     targets=len(targets), sparsity=common.sparsity_of(targets))
        side_files = common.save_side_files(lm, tokenizer, tmp)
        stages.update()
        stages.set_postfix_str("write")
        start = time.perf_counter()
        _write(fmt, lm, tmp, report, rule, opset, sparse_initializers, nm_layout)
        report.export_seconds = time.perf_counter() - start
        report.set_sizes(common.dense_bytes(tensors), common.format_files_bytes(tmp, side_files))
        stages.update()
        stages.set_postfix_str("read back")
        _verify(fmt, lm, tmp, report, rule)
        stages.update()
        if report.export_bytes >= report.dense_bytes and (fmt != "onnx" or sparse_initializers):
            _warn(report, f"the export ({report.export_bytes / 1e6:.1f} MB) is not smaller than the dense weights "
                          f"({report.dense_bytes / 1e6:.1f} MB): only {report.sparsity:.1%} of the targeted "
                          f"weights are zero, so {report.layout} saves nothing")
        write_json(tmp / common.REPORT_NAME, report)
    return report


def _write(fmt: str, lm, folder, report: ExportReport, rule: TargetRule | None, opset: int | None,
           sparse_initializers: bool, nm_layout: bool) -> None:
    from seftkit.exporters import compressed, csr, onnx

    if fmt == "csr":
        manifest = csr.write(lm, folder, rule, nm_layout=nm_layout)
        if nm_layout:
            nm24 = sum(entry["layout"] == csr.NM24 for entry in manifest["tensors"].values())
            report.layout = f"csr+nm24 ({nm24} of {report.targets} weights in the 2:4 layout)"
            if nm24 < report.targets:
                _warn(report, f"{report.targets - nm24} targeted weights are not 2:4 (or their width is not a "
                              "multiple of 8) and were stored as CSR")
    elif fmt == "compressed":
        report.layout = compressed.write(lm, folder, rule)
        note = compressed.reader_note()
        if note:
            report.notes.append(note)
    else:
        onnx.write(lm, folder, report, opset=opset, sparse_initializers=sparse_initializers)
        report.layout = "onnx+sparse-initializers" if sparse_initializers else "onnx"


def _verify(fmt: str, lm, folder, report: ExportReport, rule: TargetRule | None) -> None:
    from seftkit.exporters import compressed, csr, onnx

    if fmt == "csr":
        csr.verify(lm, folder, rule, report)
    elif fmt == "compressed":
        compressed.verify(lm, folder, report)
    else:
        onnx.check_parity(lm, folder, report)


def _warn(report: ExportReport, message: str) -> None:
    log.warning("warning: %s", message)
    report.notes.append(message)


__all__ = ["FORMATS", "check_options", "export_model"]
