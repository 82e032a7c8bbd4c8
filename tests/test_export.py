"""seftkit export: CSR, compressed-tensors and ONNX exports read back exactly by their own tools."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_model

from seftkit.cli.main import cli
from seftkit.errors import SeftkitError
from seftkit.exporters import FORMATS, ExportOptions, compressed, csr, export_model, hf
from seftkit.exporters import onnx as onnx_export
from seftkit.exporters.common import REPORT_NAME, ExportReport, target_weights
from seftkit.models import linear_weight, load_model, save_model, target_linears
from seftkit.sparsity.masks import nm_mask, nm_valid, unstructured_mask


def prune_copy(src: Path, dest: Path, nm: bool = False, sparsity: float = 0.6) -> Path:
    """Magnitude-prune every targeted weight (2:4 along inputs, or an unstructured fraction) and save."""
    model, tokenizer = load_model(src)
    with torch.no_grad():
        for module in target_linears(model).values():
            weight = linear_weight(module)
            keep = nm_mask(weight.abs(), 2, 4) if nm else unstructured_mask(weight.abs(), sparsity)
            weight.masked_fill_(~keep, 0)
    save_model(model, tokenizer, dest)
    return dest


@pytest.fixture(scope="session")
def pruned_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return prune_copy(tiny_model_dir, tmp_path_factory.mktemp("pruned") / "model")


@pytest.fixture(scope="session")
def llama_24_dir(llama_dir, tmp_path_factory) -> Path:
    return prune_copy(llama_dir, tmp_path_factory.mktemp("pruned-24") / "model", nm=True)


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def assert_same_weights(expected_dir: Path, model: torch.nn.Module) -> None:
    """Bit-exact: every tensor (tied copies included) has the same dtype and bytes as the source model's."""
    reference, _ = load_model(expected_dir, dtype="auto", with_tokenizer=False)
    got = model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(24).reshape(2, 12) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- plain HF + manifest


def test_hf_folder_loads_in_plain_transformers_with_its_manifest(pruned_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    report = export_model(pruned_dir, "hf", tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert_same_weights(pruned_dir, loaded)
    manifest = json.loads((tmp_path / "hf" / hf.MANIFEST_NAME).read_text())
    model, _ = load_model(pruned_dir, with_tokenizer=False)
    targets = target_weights(model)
    assert manifest["layers"].keys() == targets.keys() and report.targets == len(targets)
    for name, target in targets.items():
        assert manifest["layers"][name]["nnz"] == int((target.matrix != 0).sum())
        assert manifest["layers"][name]["shape"] == list(target.matrix.shape)
    assert manifest["layers"][name]["sparsity"] == pytest.approx(0.6, abs=0.02)
    written = {p.name for p in (tmp_path / "hf").iterdir()} - {hf.MANIFEST_NAME, REPORT_NAME}
    assert set(manifest["files"]) == written and "model.safetensors" in written
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((tmp_path / "hf" / name).read_bytes()).hexdigest()
    assert report.parity["files_hashed"] == len(written) and report.notes == []  # dense storage is no warning
    assert report.dtype == "float32" and report.export_bytes > report.dense_bytes  # + header and manifest


def test_hf_manifest_catches_a_changed_file(llama_24_dir, tmp_path):
    export_model(llama_24_dir, "hf", tmp_path / "hf")
    assert hf.check_manifest(tmp_path / "hf")["format"] == hf.FORMAT
    config = tmp_path / "hf" / "config.json"
    config.write_text(config.read_text().replace("\n", "\n "))
    with pytest.raises(SeftkitError, match="config.json does not match hf_manifest.json"):
        hf.check_manifest(tmp_path / "hf")


def test_bf16_in_gives_bf16_out_of_the_same_size(llama_24_dir, tmp_path):
    model, tokenizer = load_model(llama_24_dir, dtype="bf16")
    save_model(model, tokenizer, tmp_path / "bf16")
    report = export_model(tmp_path / "bf16", "hf", tmp_path / "out")  # --dtype auto: as stored
    assert report.dtype == "bfloat16"
    src, out = (tmp_path / d / "model.safetensors" for d in ("bf16", "out"))
    assert out.stat().st_size == src.stat().st_size and out.read_bytes() == src.read_bytes()
    assert_same_weights(tmp_path / "bf16", hf.load_model(tmp_path / "out"))


def test_hf_dtype_option_converts(llama_24_dir, tmp_path):
    fp32 = export_model(llama_24_dir, "hf", tmp_path / "fp32")
    half = export_model(llama_24_dir, "hf", tmp_path / "fp16", dtype="fp16")
    loaded = hf.load_model(tmp_path / "fp16")
    assert half.dtype == "float16" and {p.dtype for p in loaded.parameters()} == {torch.float16}
    reference, _ = load_model(llama_24_dir, dtype="fp16", with_tokenizer=False)
    assert_same_weights_as(reference, loaded)
    weights = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("fp32", "fp16")]
    assert weights[1] < 0.51 * weights[0] and half.dense_bytes * 2 == fp32.dense_bytes


def assert_same_weights_as(reference: torch.nn.Module, model: torch.nn.Module) -> None:
    got = model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


# ---------------------------------------------------------------- the format registry


def test_every_registered_format_has_its_module_and_help():
    import importlib

    from seftkit.bench import export_sizes

    help_text = run_cli("--help").stdout
    for fmt in FORMATS.values():
        module = importlib.import_module(f"seftkit.exporters.{fmt.module}")
        assert callable(module.export) and callable(module.verify), fmt.name
        assert f"{fmt.name}:" in help_text
        assert all(option in ("opset", "sparse_initializers", "nm_layout") for option in fmt.options)
    assert {name for name, _ in export_sizes.EXPORTS.values()} == set(FORMATS)
    assert export_sizes.applies("csr+nm24", "2:4") and not export_sizes.applies("csr+nm24", "70%")
    assert export_sizes.applies("onnx+sparse-init", "70%") and not export_sizes.applies("onnx+sparse-init", "50%")
    described = " ".join(help_text.split())
    assert "compressed-tensors <= 0.12; current runtimes (vLLM >= 0.19" in described and "vLLM format" not in described


# ---------------------------------------------------------------- CSR


def test_csr_round_trip_is_bit_exact(pruned_dir, tmp_path):
    report = export_model(pruned_dir, "csr", tmp_path / "csr")
    loaded = csr.load_model(tmp_path / "csr")
    assert_same_weights(pruned_dir, loaded)
    reference, _ = load_model(pruned_dir, with_tokenizer=False)
    assert torch.equal(logits(loaded), logits(reference))
    assert report.parity["max_abs_diff"] == 0.0 and report.parity["scipy_matrices_equal"] == report.targets
    assert report.sparsity == pytest.approx(0.6, abs=0.01) and report.export_bytes < report.dense_bytes
    saved = json.loads((tmp_path / "csr" / REPORT_NAME).read_text())
    assert saved["export_bytes"] == report.export_bytes and saved["size_ratio"] == pytest.approx(report.size_ratio)


def test_scipy_reads_every_csr_matrix_as_the_torch_weight(pruned_dir, tmp_path):
    export_model(pruned_dir, "csr", tmp_path / "csr")
    model, _ = load_model(pruned_dir, with_tokenizer=False)
    manifest = json.loads((tmp_path / "csr" / csr.MANIFEST_NAME).read_text())
    targets = target_linears(model)
    assert {name for name, e in manifest["tensors"].items() if e["layout"] == csr.CSR} == {
        f"{name}.weight" for name in targets}
    for name, module in targets.items():
        weight = linear_weight(module).detach()  # [out, in], also for GPT-2's Conv1D stored [in, out]
        matrix = csr.load_matrix(tmp_path / "csr", f"{name}.weight")
        assert matrix.shape == tuple(weight.shape)
        assert matrix.nnz == int((weight != 0).sum())
        np.testing.assert_array_equal(matrix.toarray(), weight.numpy())
        entry = manifest["tensors"][f"{name}.weight"]
        assert entry["parts"] == {"crow_indices": "int16", "col_indices": "int16", "values": "float32"}
        assert entry["transposed"] == (type(module).__name__ == "Conv1D")


def test_csr_index_dtype_widens_past_int16():
    narrow = csr.csr_parts(torch.ones(1, 32768))
    wide = csr.csr_parts(torch.ones(1, 32769))
    assert narrow["col_indices"].dtype == torch.int16 and narrow["crow_indices"].dtype == torch.int32
    assert wide["col_indices"].dtype == torch.int32 and wide["col_indices"][-1] == 32768


def test_load_matrix_refuses_a_dense_tensor(llama_24_dir, tmp_path):
    export_model(llama_24_dir, "csr", tmp_path / "csr")
    with pytest.raises(SeftkitError, match="model.embed_tokens.weight is not a sparse weight"):
        csr.load_matrix(tmp_path / "csr", "model.embed_tokens.weight")


# ---------------------------------------------------------------- 2:4 layout


def test_nm24_codec_round_trips_with_spare_zeros():
    torch.manual_seed(0)
    weight = torch.randn(6, 32)
    weight.masked_fill_(~nm_mask(weight.abs(), 2, 4), 0)
    weight[0, :8] = 0  # groups with 4 zeros
    weight[1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 5.0])  # a group with 3 zeros
    parts = csr.nm24_parts(weight)
    assert parts["nm_values"].shape == (6, 16) and parts["nm_positions"].shape == (6, 4)
    assert parts["nm_positions"].dtype == torch.uint8
    assert torch.equal(csr.nm24_dense(parts, (6, 32)), weight)
    # positions are the kept indices within each group, 2 bits each, low bits first
    first = parts["nm_positions"][2, 0].item()
    kept = (weight[2, :8] != 0).nonzero().flatten().tolist()
    assert [(first >> s) & 3 for s in (0, 2, 4, 6)] == [kept[0], kept[1], kept[2] - 4, kept[3] - 4]


def test_nm_layout_export_is_exact_and_smaller_than_csr(llama_24_dir, tmp_path):
    plain = export_model(llama_24_dir, "csr", tmp_path / "csr")
    packed = export_model(llama_24_dir, "csr", tmp_path / "nm", options=ExportOptions(nm_layout=True))
    manifest = json.loads((tmp_path / "nm" / csr.MANIFEST_NAME).read_text())
    layouts = [e["layout"] for e in manifest["tensors"].values() if e["layout"] != csr.DENSE]
    assert layouts == [csr.NM24] * packed.targets and packed.layout.startswith("csr+nm24 (14 of 14")
    assert_same_weights(llama_24_dir, csr.load_model(tmp_path / "nm"))
    assert packed.export_bytes < plain.export_bytes
    name = "model.layers.0.mlp.down_proj.weight"
    weight = load_model(llama_24_dir, with_tokenizer=False)[0].state_dict()[name]
    np.testing.assert_array_equal(csr.load_matrix(tmp_path / "nm", name).toarray(), weight.numpy())


def test_nm_layout_keeps_non_24_weights_as_csr(pruned_dir, tmp_path):
    report = export_model(pruned_dir, "csr", tmp_path / "nm", options=ExportOptions(nm_layout=True))
    assert report.layout.startswith("csr+nm24 (0 of")
    assert any("were stored as CSR" in note for note in report.notes)
    assert_same_weights(pruned_dir, csr.load_model(tmp_path / "nm"))


# ---------------------------------------------------------------- compressed-tensors


def numpy_decompress(tensors: dict[str, torch.Tensor], module: str) -> np.ndarray:
    """The compressed-tensors bitmask layout decoded with numpy only (independent of the exporter's reader)."""
    rows, cols = tensors[f"{module}.shape"].flatten().tolist()
    keep = np.unpackbits(tensors[f"{module}.bitmask"].numpy(), axis=1, count=cols, bitorder="little").astype(bool)
    dense = np.zeros((rows, cols), dtype=np.float32)
    dense[keep] = tensors[f"{module}.compressed"].numpy().reshape(-1)
    return dense


def test_compressed_bitmask_decompresses_to_the_same_weights(pruned_dir, tmp_path):
    from compressed_tensors.config import SparsityCompressionConfig
    from safetensors.torch import load_file

    report = export_model(pruned_dir, "compressed", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    sparsity = SparsityCompressionConfig.load_from_registry(config["sparsity_config"]["format"],
                                                            **config["sparsity_config"])
    assert sparsity.format == report.layout == "sparse-bitmask"
    assert sparsity.global_sparsity == pytest.approx(report.sparsity)
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    model, _ = load_model(pruned_dir, with_tokenizer=False)
    assert sorted(sparsity.targets) == sorted(target_linears(model))
    for module in sparsity.targets:
        weight = model.get_submodule(module).weight.detach()  # as stored: [in, out] for GPT-2
        np.testing.assert_array_equal(numpy_decompress(stored, module), weight.numpy())
        assert f"{module}.weight" not in stored and stored[f"{module}.row_offsets"][0] == 0
    assert_same_weights(pruned_dir, compressed.load_model(tmp_path / "ct"))
    assert report.export_bytes < report.dense_bytes


def test_compressed_24_for_2_4_weights(llama_24_dir, tmp_path):
    from safetensors.torch import load_file

    report = export_model(llama_24_dir, "compressed", tmp_path / "ct")
    assert report.layout == "sparse-24-bitmask"
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    values = stored["model.layers.1.self_attn.o_proj.compressed"]
    assert values.shape == (32, 16) and stored["model.layers.1.self_attn.o_proj.shape"].shape == (2, 1)
    bits = np.unpackbits(stored["model.layers.1.self_attn.o_proj.bitmask"].numpy(), axis=1, bitorder="little")
    assert (bits.reshape(32, -1, 4).sum(axis=2) == 2).all()  # exactly 2 of every 4, as the 2:4 kernels need
    model = compressed.load_model(tmp_path / "ct")
    assert_same_weights(llama_24_dir, model)


def test_gpt2_2_4_falls_back_to_bitmask(tmp_path):
    """GPT-2 stores Conv1D weights [in, out]: 2:4 along inputs is not 2:4 along the stored rows."""
    src = prune_copy(save_tiny_model(tmp_path / "gpt2", "gpt2"), tmp_path / "gpt2-24", nm=True)
    model, _ = load_model(src, with_tokenizer=False)
    assert all(nm_valid(t.matrix, 2, 4) for t in target_weights(model).values())
    report = export_model(src, "compressed", tmp_path / "ct")
    assert report.layout == "sparse-bitmask"
    assert_same_weights(src, compressed.load_model(tmp_path / "ct"))


# Byte-for-byte what compressed-tensors 0.12.2 (the last release with the sparse compressors) wrote for this
# weight with BitmaskCompressor / Sparse24BitMaskCompressor.compress({"m.weight": W}).
_GOLDEN_WEIGHT = [[0.0, 1.5, 0.0, -2.0, 0.0, 0.0, 3.0, 0.25], [-1.0, 0.0, 0.0, 0.5, 0.0, 0.75, 0.0, -4.0]]
_GOLDEN = {
    compressed.BITMASK: {"shape": [2, 8], "compressed": [1.5, -2.0, 3.0, 0.25, -1.0, 0.5, 0.75, -4.0],
                         "bitmask": [[202], [169]], "row_offsets": [0, 4]},
    compressed.SPARSE24: {"shape": [[2], [8]], "compressed": [[1.5, -2.0, 3.0, 0.25], [-1.0, 0.5, 0.75, -4.0]],
                          "bitmask": [[202], [169]]},
}


@pytest.mark.parametrize("fmt", [compressed.BITMASK, compressed.SPARSE24])
def test_compressed_layout_matches_the_library_byte_for_byte(fmt):
    weight = torch.tensor(_GOLDEN_WEIGHT)
    parts = (compressed.sparse24_parts if fmt == compressed.SPARSE24 else compressed.bitmask_parts)(weight)
    assert {k: v.tolist() for k, v in parts.items()} == _GOLDEN[fmt]
    assert parts["bitmask"].dtype == torch.uint8 and parts["shape"].dtype == torch.int64
    assert torch.equal(compressed.decompress_parts(parts), weight)


# ---------------------------------------------------------------- ONNX (two families: export takes seconds)


def ort_logits(folder: Path, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]


def assert_cached_graph_generates_like_torch(folder: Path, model: torch.nn.Module, report: ExportReport) -> None:
    """The KV-cache graph has Optimum's names and greedy-generates torch's tokens (a prompt of our own here)."""
    import onnxruntime as ort

    assert report.parity["cached_greedy_tokens_equal"] == report.parity["cached_greedy_tokens"] == 16
    session = ort.InferenceSession(str(folder / onnx_export.CACHED_GRAPH_NAME), providers=["CPUExecutionProvider"])
    layers = model.config.num_hidden_layers
    assert [i.name for i in session.get_inputs()] == [
        "input_ids", "attention_mask", "position_ids", *onnx_export.past_names(layers)]
    assert [o.name for o in session.get_outputs()] == ["logits", *onnx_export.present_names(layers)]
    prompt = torch.tensor([[5, 17, 42, 9, 77]])
    got, _ = onnx_export.ort_greedy(session, prompt.numpy(), 16)
    with torch.no_grad():
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                  min_new_tokens=16, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert got == expected


def test_onnx_matches_torch_on_two_shapes(llama_24_dir, tmp_path):
    import onnx

    report = export_model(llama_24_dir, "onnx", tmp_path / "onnx")
    assert report.parity["max_abs_diff_1x7"] < 1e-4 and report.parity["max_abs_diff_3x19"] < 1e-4
    assert report.parity["below_1e-4_abs"]
    assert report.notes == ["2 files each hold every weight; sizes compare with 2 dense copies"]
    assert report.dense_bytes == 2 * export_model(llama_24_dir, "hf", tmp_path / "hf").dense_bytes
    graph = onnx.load(tmp_path / "onnx" / "model.onnx")
    onnx.checker.check_model(graph, full_check=True)
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input]
    assert all(isinstance(d, str) for row in dims for d in row)  # batch and sequence are dynamic
    assert report.parity["ir_version"] == graph.ir_version <= 10
    # a third shape, checked here independently of the exporter's own parity check
    model, _ = load_model(llama_24_dir, with_tokenizer=False)
    ids = torch.arange(10).reshape(2, 5) * 7 % model.config.vocab_size
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(ort_logits(tmp_path / "onnx", ids, mask), expected, atol=1e-4, rtol=0)
    assert_cached_graph_generates_like_torch(tmp_path / "onnx", model, report)
    # the parity check catches a graph that is not the model: nudge one weight in torch only
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 0.5
    with pytest.raises(SeftkitError, match="onnxruntime logits differ from torch by"):
        onnx_export.check_parity(model, tmp_path / "onnx", ExportReport("onnx", "onnx", "m", "o", "float32"))


def test_onnx_sparse_initializers_gpt2(tmp_path):
    import onnx

    src = prune_copy(save_tiny_model(tmp_path / "gpt2", "gpt2"), tmp_path / "gpt2-80", sparsity=0.8)
    dense = export_model(src, "onnx", tmp_path / "dense")
    sparse = export_model(src, "onnx", tmp_path / "sparse", options=ExportOptions(sparse_initializers=True, opset=18))
    graph = onnx.load(tmp_path / "sparse" / "model.onnx")
    assert sparse.parity["opset"] == 18 and {o.version for o in graph.opset_import if o.domain == ""} == {18}
    assert len(graph.graph.sparse_initializer) == sparse.targets == 8  # 4 Conv1D per block, 2 blocks
    assert sparse.export_bytes < dense.export_bytes
    assert sparse.parity["max_abs_diff"] < 1e-4
    assert any("onnxruntime densifies them at load" in note for note in sparse.notes)
    cached = onnx.load(tmp_path / "sparse" / onnx_export.CACHED_GRAPH_NAME)
    assert len(cached.graph.sparse_initializer) == sparse.parity["sparse_initializers_model_with_past.onnx"] == 8
    model, _ = load_model(src, with_tokenizer=False)
    assert_cached_graph_generates_like_torch(tmp_path / "dense", model, dense)
    assert_cached_graph_generates_like_torch(tmp_path / "sparse", model, sparse)


# ---------------------------------------------------------------- CLI and bad input


def test_cli_writes_report_and_summary(llama_24_dir, tmp_path):
    result = run_cli(llama_24_dir, "--format", "csr", "--out", tmp_path / "out", "--nm-layout",
                     "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    assert "exported" in result.stdout and "csr+nm24" in result.stdout and "max_abs_diff 0" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report == json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["targets"] == 14 and report["sparsity"] == 0.5
    files = [tmp_path / "out" / name for name in (csr.WEIGHTS_NAME, csr.MANIFEST_NAME)]
    assert report["export_bytes"] == sum(f.stat().st_size for f in files)
    assert report["size_ratio"] == pytest.approx(report["export_bytes"] / report["dense_bytes"])
    assert {"config.json", "tokenizer.json", csr.MANIFEST_NAME, csr.WEIGHTS_NAME} <= {
        p.name for p in (tmp_path / "out").iterdir()}


def test_dense_model_as_csr_warns_that_it_saves_nothing(llama_dir, tmp_path):
    result = run_cli(llama_dir, "--format", "csr", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "0.0% of the targeted weights are zero, so csr saves nothing" in result.stderr
    assert_same_weights(llama_dir, csr.load_model(tmp_path / "out"))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "gguf"], "unknown export format 'gguf': choose one of hf, csr, compressed, onnx"),
    (["--format", "onnx", "--nm-layout"], "--nm-layout applies to --format csr only"),
    (["--format", "csr", "--opset", "18"], "--opset applies to --format onnx only"),
    (["--format", "hf", "--sparse-initializers"], "--sparse-initializers applies to --format onnx only"),
    (["--format", "onnx", "--dtype", "bf16"], "--format onnx writes fp32 only, not bf16"),
    (["--format", "onnx", "--opset", "17"], "--opset 17 is too old for the torch exporter"),
    (["--format", "csr", "--dtype", "int3"], "unknown dtype 'int3'"),
])
def test_bad_options_fail_in_one_line(llama_24_dir, tmp_path, args, message):
    result = run_cli(llama_24_dir, *args, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"seftkit: error: {message}") and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(llama_24_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli(llama_24_dir, "--format", "csr", "--out", out)
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run_cli(llama_24_dir, "--format", "csr", "--out", out, "--overwrite").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / csr.MANIFEST_NAME).is_file() and leftovers(tmp_path) == []


def test_unwritable_output_fails_cleanly(llama_24_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli(llama_24_dir, "--format", "csr", "--out", blocker / "out")
    assert result.exit_code == 2 and result.stderr.startswith("seftkit: error: cannot create output folder")
    assert result.stderr.count("\n") == 1 and leftovers(tmp_path) == []


def test_failure_after_writing_leaves_nothing(llama_24_dir, tmp_path, monkeypatch):
    def corrupt(*args, **kwargs):
        raise RuntimeError("read-back mismatch")

    monkeypatch.setattr(csr, "verify", corrupt)
    with pytest.raises(RuntimeError, match="read-back mismatch"):
        export_model(llama_24_dir, "csr", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_output_cannot_be_the_input(llama_24_dir):
    result = run_cli(llama_24_dir, "--format", "csr", "--out", llama_24_dir, "--overwrite")
    assert result.exit_code == 2 and "is the input model" in result.stderr


def test_bf16_export_keeps_dtype_and_scipy_widens(llama_24_dir, tmp_path):
    report = export_model(llama_24_dir, "csr", tmp_path / "bf16", dtype="bf16")
    assert report.dtype == "bfloat16"
    manifest = json.loads((tmp_path / "bf16" / csr.MANIFEST_NAME).read_text())
    assert manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]["parts"]["values"] == "bfloat16"
    reference, tokenizer = load_model(llama_24_dir, dtype="bf16")
    loaded = csr.load_model(tmp_path / "bf16")
    for name, tensor in reference.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.bfloat16 and torch.equal(loaded.state_dict()[name], tensor)
    matrix = csr.load_matrix(tmp_path / "bf16", "model.layers.0.mlp.up_proj.weight")
    assert matrix.dtype == np.float32
    weight = reference.model.layers[0].mlp.up_proj.weight.detach()
    np.testing.assert_array_equal(matrix.toarray(), weight.float().numpy())
    # "auto" keeps what is stored: re-exporting the bf16 model's compressed-tensors form stays bf16
    save_model(reference, tokenizer, tmp_path / "bf16-src")
    assert export_model(tmp_path / "bf16-src", "compressed", tmp_path / "ct").dtype == "bfloat16"
