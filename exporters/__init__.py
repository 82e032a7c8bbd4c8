"""Writers for formats other tools read: plain HF, CSR, compressed-tensors, ONNX (see :mod:`.registry`).

:func:`export_model` is the one entry point (the ``seftkit export`` command calls it): it loads the model,
writes the chosen format into a temp folder, reads it back with that format's own tool (transformers, scipy,
the compressed-tensors layout, onnxruntime) and only then moves the folder into place, with its report.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import TYPE_CHECKING

from seftkit.exporters.registry import FORMATS, ExportFormat, ExportOptions, get_format

if TYPE_CHECKING:
    from seftkit.exporters.common import ExportReport
    from seftkit.sparsity.targets import TargetRule

log = logging.getLogger(__name__)


def export_model(
    model: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    dtype: str = "auto",
    options: ExportOptions | None = None,
    overwrite: bool = False,
    rule: TargetRule | None = None,
    progress: bool = False,
) -> ExportReport:
    """Export ``model`` as ``fmt`` into ``out`` (atomically) in ``dtype`` (``auto``: as stored), proven by
    reading it back; returns the report."""
    from tqdm import tqdm

    from seftkit.exporters import common
    from seftkit.io import atomic_dir, check_output_path, write_json
    from seftkit.models import check_finite, load_model, resolve_model_path

    entry = get_format(fmt)
    options = options or ExportOptions()
    entry.check(dtype, options)
    writer = importlib.import_module(f"seftkit.exporters.{entry.module}")
    source = resolve_model_path(model)
    check_output_path(out, overwrite, inputs=(source,))
    with atomic_dir(out, overwrite) as tmp, tqdm(total=3, desc=f"export {fmt}", unit="step", leave=False,
                                                  disable=not progress) as stages:
        stages.set_postfix_str("load")
        lm, tokenizer = load_model(source, dtype=entry.load_dtype(dtype))
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
        writer.export(lm, tmp, report, rule, options)
        report.export_seconds = time.perf_counter() - start
        report.set_sizes(common.dense_bytes(tensors) * entry.weight_copies, common.format_files_bytes(tmp, side_files))
        if entry.weight_copies > 1:
            report.notes.append(f"{entry.weight_copies} files each hold every weight; sizes compare with "
                                f"{entry.weight_copies} dense copies")
        stages.update()
        stages.set_postfix_str("read back")
        writer.verify(lm, tmp, report, rule)
        stages.update()
        if report.export_bytes >= report.dense_bytes and entry.stores_sparse(options):
            common.warn(report, f"the export ({report.export_bytes / 1e6:.1f} MB) is not smaller than the dense "
                                f"weights ({report.dense_bytes / 1e6:.1f} MB): only {report.sparsity:.1%} of the "
                                f"targeted weights are zero, so {report.layout} saves nothing")
        write_json(tmp / common.REPORT_NAME, report)
    return report


__all__ = ["FORMATS", "ExportFormat", "ExportOptions", "export_model", "get_format"]
