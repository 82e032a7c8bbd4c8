"""ONNX graphs: logits only (``model.onnx``) and a decoder with a KV cache (``model_with_past.onnx``).

The logits graph (input_ids, attention_mask -> logits) is exported with the torch.export-based exporter
(``dynamo=True``) with dynamic batch and sequence axes, the KV cache off and a wrapper that returns only the
logits, so the graph is one clean function ORT can run. The weights are stored beside the graph
(``model.onnx.data``) once they approach protobuf's 2 GB limit. ``sparse_initializers`` moves weights above 2/3
sparsity into ONNX sparse initializers (COO with int64 indices: 12 bytes per non-zero against 4 per dense fp32
entry, so they pay off only above 2/3): that shrinks the file, but onnxruntime densifies them when it loads the
model, so memory and speed are those of dense.

The cached decoder uses the names Optimum's ``ORTModelForCausalLM`` and onnxruntime-genai expect: inputs
``input_ids``, ``attention_mask`` (past and new tokens), ``position_ids``, ``past_key_values.{i}.key/.value``
([batch, kv heads, past, head dim]); outputs ``logits``, ``present.{i}.key/.value``. A past of length 0 is the
prefill, so one graph serves both steps. It is proven by greedy-generating in onnxruntime with the cache and
comparing the tokens with torch's ``generate``. Each graph holds its own copy of the weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from seftkit.errors import SeftkitError, first_line
from seftkit.exporters.common import ExportReport

if TYPE_CHECKING:
    import onnx
    import torch
    from transformers import PreTrainedModel

    from seftkit.exporters.registry import ExportOptions
    from seftkit.sparsity.targets import TargetRule

GRAPH_NAME = "model.onnx"
CACHED_GRAPH_NAME = "model_with_past.onnx"
CACHE_CHECK_TOKENS = 16  # greedy tokens the cached graph must reproduce exactly
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


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def _cached_module(model: PreTrainedModel, layers: int) -> torch.nn.Module:
    import torch
    from transformers import DynamicCache

    class WithPast(torch.nn.Module):
        """The causal LM over flat past key/value tensors (ONNX has no cache objects), returning the present."""

        def __init__(self, lm: PreTrainedModel) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return WithPast(model).eval()


def export_cached_graph(model: PreTrainedModel, opset: int | None = None) -> onnx.ModelProto:
    """Trace the decoder with past key/values; batch, new and past lengths are dynamic (past may be 0)."""
    import torch

    layers = model.config.num_hidden_layers
    ids = _inputs(model.config.vocab_size, batch=2, seq=5, pad=0)["input_ids"]
    with torch.no_grad():  # an example past of the model's own cache shapes, whatever its head layout
        cache = model(input_ids=ids[:, :3], use_cache=True).past_key_values
    past = tuple(t for layer in cache.layers for t in (layer.keys, layer.values))
    example = (ids[:, 3:], torch.ones_like(ids), torch.arange(3, 5).expand(2, 2), *past)
    batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    past_len, total = torch.export.Dim("past_sequence_length"), torch.export.Dim("total_sequence_length")
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past_len} for _ in past)}
    return _export(model, _cached_module(model, layers), example, dynamic, opset,
                   ["input_ids", "attention_mask", "position_ids", *past_names(layers)],
                   ["logits", *present_names(layers)])


def export_graph(model: PreTrainedModel, opset: int | None = None) -> onnx.ModelProto:
    """Trace the logits graph with dynamic batch and sequence axes (torch.export, the current exporter)."""
    import torch

    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    example = _inputs(model.config.vocab_size, batch=2, seq=8, pad=0)
    return _export(model, _logits_module(model), tuple(example.values()),
                   {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}, opset,
                   ["input_ids", "attention_mask"], ["logits"])


def _export(model: PreTrainedModel, module: torch.nn.Module, example: tuple, dynamic: dict, opset: int | None,
            inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    import torch

    try:
        program = torch.onnx.export(module, example, dynamo=True, opset_version=opset, verbose=False,
                                    input_names=inputs, output_names=outputs, dynamic_shapes=dynamic)
    except Exception as exc:  # the exporter raises many types; all mean this architecture did not trace
        raise SeftkitError(f"ONNX export of {type(model).__name__} failed: {first_line(exc)}") from None
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


def save_graph(proto: onnx.ModelProto, folder: Path, external: bool, full_check: bool = True,
               name: str = GRAPH_NAME) -> None:
    """Save (weights to ``<name>.data`` when ``external``) and run the ONNX checker on the file."""
    import onnx

    path = folder / name
    onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{name}.data", size_threshold=1024)
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


def export(model: PreTrainedModel, folder: Path, report: ExportReport, rule: TargetRule | None,
           options: ExportOptions) -> None:
    """The registry's entry point; ``rule`` does not apply (the graph holds every weight as the model has it)."""
    write(model, folder, report, opset=options.opset, sparse_initializers=options.sparse_initializers)
    report.layout = "onnx+sparse-initializers" if options.sparse_initializers else "onnx"


def verify(model: PreTrainedModel, folder: Path, report: ExportReport, rule: TargetRule | None = None) -> None:
    """Logits parity on two shapes, then the same greedy tokens with the cache as torch."""
    check_parity(model, folder, report)
    check_cached_generation(model, folder, report)


def write(model: PreTrainedModel, folder: Path, report: ExportReport, opset: int | None = None,
          sparse_initializers: bool = False) -> None:
    """Export, check, optionally sparsify and save both graphs; record opset, IR version and layout notes."""
    for name, export in ((GRAPH_NAME, export_graph), (CACHED_GRAPH_NAME, export_cached_graph)):
        proto = export(model, opset)
        report.parity["opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        report.parity["ir_version"] = proto.ir_version
        _save(proto, folder, name, report, sparse_initializers)
    if sparse_initializers:
        report.notes.append("weights above 2/3 sparsity stored as ONNX sparse initializers; onnxruntime "
                            "densifies them at load, so they save disk, not memory")


def _save(proto: onnx.ModelProto, folder: Path, name: str, report: ExportReport, sparse_initializers: bool) -> None:
    import onnx

    external = weight_bytes(proto) > _PROTOBUF_LIMIT
    if external:
        report.notes.append(f"{name}: weights in external data ({name}.data): the graph is over 2 GB")
    if sparse_initializers:
        # ONNX type inference rejects sparse_tensor operands (e.g. Gemm's B), so the full check (types and
        # shapes) runs on the dense graph and the sparse file gets the structural check.
        if not external:
            onnx.checker.check_model(proto, full_check=True)
        report.parity[f"sparse_initializers_{name}"] = sparsify_initializers(proto)
    save_graph(proto, folder, external, full_check=not sparse_initializers, name=name)


def ort_greedy(session, prompt: np.ndarray, tokens: int) -> tuple[list[int], float]:
    """Greedy-generate ``tokens`` tokens after ``prompt`` ([1, n] int64) with the cached graph in onnxruntime,
    feeding each step's present back as the next past; returns the tokens and the decode seconds (after the
    first token, as ``seftkit generate`` counts them)."""
    past = {i.name: np.zeros([1, i.shape[1], 0, i.shape[3]], np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    names = [o.name for o in session.get_outputs()]
    ids, seen, out, first = prompt, 0, [], 0.0
    for _ in range(tokens):
        n = ids.shape[1]
        results = session.run(names, {"input_ids": ids, "attention_mask": np.ones([1, seen + n], np.int64),
                                      "position_ids": np.arange(seen, seen + n, dtype=np.int64)[None], **past})
        out.append(int(results[0][0, -1].argmax()))
        first = first or time.perf_counter()
        past = {name.replace("present.", "past_key_values."): value
                for name, value in zip(names[1:], results[1:], strict=True)}
        ids, seen = np.array([[out[-1]]], np.int64), seen + n
    return out, time.perf_counter() - first


def check_cached_generation(model: PreTrainedModel, folder: Path, report: ExportReport,
                            tokens: int = CACHE_CHECK_TOKENS) -> None:
    """Greedy-generate with the cached graph in onnxruntime and with torch; the tokens must be identical."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(folder / CACHED_GRAPH_NAME), providers=["CPUExecutionProvider"])
    prompt = _inputs(model.config.vocab_size, batch=1, seq=7, pad=0)["input_ids"]
    got, ort_seconds = ort_greedy(session, prompt.numpy(), tokens)
    from seftkit.generation import StepClock

    clock = StepClock()
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                                  min_new_tokens=tokens, do_sample=False, streamer=clock,
                                  pad_token_id=model.config.eos_token_id)[0, prompt.shape[1]:].tolist()
    torch_seconds = time.perf_counter() - clock.arrivals[0]
    same = int(np.cumprod(np.array(got) == np.array(expected)).sum())
    report.parity.update({"cached_greedy_tokens_equal": same, "cached_greedy_tokens": tokens,
                          "ort_cached_decode_tokens_per_s": (tokens - 1) / ort_seconds,
                          "torch_decode_tokens_per_s": (tokens - 1) / torch_seconds})
    if same < tokens:
        raise SeftkitError(f"onnxruntime with the KV cache generated different greedy tokens from torch (first "
                           f"{same} of {tokens} agree); the graphs were not kept")
