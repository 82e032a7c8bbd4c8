"""ONNX logits graph (input_ids, attention_mask -> logits), proven against torch in onnxruntime.

Exported with the torch.export-based exporter (``dynamo=True``) with dynamic batch and sequence axes, the KV
cache off and a wrapper that returns only the logits, so the graph is one clean function ORT can run. The
weights are stored beside the graph (``model.onnx.data``) once they approach protobuf's 2 GB limit.
``sparse_initializers`` moves weights above 2/3 sparsity into ONNX sparse initializers (COO with int64
indices: 12 bytes per non-zero against 4 per dense fp32 entry, so they pay off only above 2/3): that shrinks
the file, but onnxruntime densifies them when it loads the model, so memory and speed are those of dense.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seftkit.errors import SeftkitError
from seftkit.exporters.common import ExportReport

if TYPE_CHECKING:
    import onnx
    import torch
    from transformers import PreTrainedModel

GRAPH_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
PARITY_TOLERANCE = 1e-4  # fp32 logits, max abs diff against torch, per unit of logit scale (see check_parity)
SPARSE_INITIALIZER_MIN_SPARSITY = 2 / 3
_PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # 2 GiB less headroom for the graph itself
# (batch, sequence, left padding of the first row): two shapes, the second batched with padding.
PARITY_SHAPES = ((1, 7, 0), (3, 19, 4))


def _logits_module(model: PreTrainedModel) -> torch.nn.Module:
    import torch

    class LogitsOnly(torch.nn.Module):
        """The causal LM without cache or extra outputs: what a serving graph needs."""

        def __init__(self, lm: PreTrainedModel) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return LogitsOnly(model).eval()


def export_graph(model: PreTrainedModel, opset: int | None = None) -> onnx.ModelProto:
    """Trace the logits graph with dynamic batch and sequence axes (torch.export, the current exporter)."""
    import torch

    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    example = _inputs(model.config.vocab_size, batch=2, seq=8, pad=0)
    try:
        program = torch.onnx.export(
            _logits_module(model), tuple(example.values()), dynamo=True, opset_version=opset, verbose=False,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}})
    except Exception as exc:  # the exporter raises many types; all mean this architecture did not trace
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SeftkitError(f"ONNX export of {type(model).__name__} failed: {first}") from None
    proto = program.model_proto
    for node in proto.graph.node:  # per-node FX stack traces: debugging aids that grow the file ~2.5x on tiny models
        del node.metadata_props[:]
    return proto


def sparsify_initializers(proto: onnx.ModelProto, min_sparsity: float = SPARSE_INITIALIZER_MIN_SPARSITY) -> int:
    """Move 2-D float initializers sparser than ``min_sparsity`` to COO sparse initializers; returns how many."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    moved: set[str] = set()
    for init in list(graph.initializer):
        if len(init.dims) != 2 or init.data_type not in _float_types():
            continue
        flat = numpy_helper.to_array(init).reshape(-1)
        nonzero = np.flatnonzero(flat)
        if 1 - nonzero.size / flat.size <= min_sparsity:
            continue
        values = numpy_helper.from_array(flat[nonzero], init.name)
        indices = numpy_helper.from_array(nonzero.astype(np.int64), f"{init.name}.indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(init.dims)))
        graph.initializer.remove(init)
        moved.add(init.name)
    # a dense type annotation on a now-sparse name fails the checker's type inference
    for info in [v for v in graph.value_info if v.name in moved]:
        graph.value_info.remove(info)
    return len(moved)


def _float_types() -> tuple[int, ...]:
    from onnx import TensorProto

    return (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def weight_bytes(proto: onnx.ModelProto) -> int:
    graph = proto.graph
    return (sum(len(t.raw_data) for t in graph.initializer)
            + sum(len(t.values.raw_data) + len(t.indices.raw_data) for t in graph.sparse_initializer))


def save_graph(proto: onnx.ModelProto, folder: Path, external: bool, full_check: bool = True) -> None:
    """Save (weights to ``model.onnx.data`` when ``external``) and run the ONNX checker on the file."""
    import onnx

    path = folder / GRAPH_NAME
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=DATA_NAME, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=full_check)


def _inputs(vocab_size: int, batch: int, seq: int, pad: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids and a mask whose first row is left-padded by ``pad`` tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed + batch * 1000 + seq)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def check_parity(model: PreTrainedModel, folder: Path, report: ExportReport) -> None:
    """Run the graph in onnxruntime on two shapes and compare the logits of real (unpadded) tokens with torch.

    The bar is 1e-4 absolute for logits up to 1 in size, scaled by the largest logit above that: fp32 rounding
    grows with the logits, and on SmolLM2-135M (logits up to ~30) torch's own fp32 forward is 0.7-1.5e-4 away
    from its fp64 forward, so an absolute 1e-4 would reject a correct graph. (At 70% sparsity one padded-batch row
    reached 3e-3 against torch with logits up to 40; torch fp32 itself was 2.6e-4 from fp64 on that row.)
    """
    import onnxruntime as ort
    import torch

    start = time.perf_counter()
    session = ort.InferenceSession(str(folder / GRAPH_NAME), providers=["CPUExecutionProvider"])
    report.load_seconds = time.perf_counter() - start
    logits = _logits_module(model)
    worst, scale = 0.0, 1.0
    for batch, seq, pad in PARITY_SHAPES:
        inputs = _inputs(model.config.vocab_size, batch, seq, pad)
        real = inputs["attention_mask"].bool().numpy()
        with torch.no_grad():
            expected = logits(**inputs).float().numpy()
        got = session.run(["logits"], {name: t.numpy() for name, t in inputs.items()})[0]
        diff = _max_diff(got, expected, real)
        report.parity[f"max_abs_diff_{batch}x{seq}"] = diff
        worst, scale = max(worst, diff), max(scale, float(np.abs(expected[real]).max()))
    tolerance = PARITY_TOLERANCE * scale
    report.parity.update({"max_abs_diff": worst, "max_abs_logit": scale, "tolerance": tolerance,
                          "below_1e-4_abs": worst < PARITY_TOLERANCE})
    if not worst < tolerance:
        raise SeftkitError(f"onnxruntime logits differ from torch by {worst:.3g} (> {tolerance:.3g}); "
                           "the graph was not kept")
    if worst >= PARITY_TOLERANCE:
        report.notes.append(f"onnxruntime vs torch max abs diff {worst:.2g} is above 1e-4 absolute but within 1e-4 "
                            f"of the logit scale ({scale:.1f})")


def _max_diff(got: np.ndarray, expected: np.ndarray, real: np.ndarray) -> float:
    """Max abs difference over real tokens: padded queries attend to nothing and their logits are arbitrary."""
    return float(np.abs(got - expected)[real].max())


def write(model: PreTrainedModel, folder: Path, report: ExportReport, opset: int | None = None,
          sparse_initializers: bool = False) -> None:
    """Export, check, optionally sparsify and save the graph; record opset, IR version and layout notes."""
    import onnx

    proto = export_graph(model, opset)
    report.parity["opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    report.parity["ir_version"] = proto.ir_version
    external = weight_bytes(proto) > _PROTOBUF_LIMIT
    if external:
        report.notes.append(f"weights in external data ({DATA_NAME}): the graph is over 2 GB")
    if sparse_initializers:
        # ONNX type inference rejects sparse_tensor operands (e.g. Gemm's B), so the full check (types and
        # shapes) runs on the dense graph and the sparse file gets the structural check.
        if not external:
            onnx.checker.check_model(proto, full_check=True)
        moved = sparsify_initializers(proto)
        report.notes.append(f"{moved} weights stored as ONNX sparse initializers (sparsity > 2/3); "
                            "onnxruntime densifies them at load, so they save disk, not memory")
    save_graph(proto, folder, external, full_check=not sparse_initializers)
