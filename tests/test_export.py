"""seftkit export: CSR, compressed-tensors and ONNX exports read back exactly by their own tools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_model
from seftkit.cli.main import cli
from seftkit.exporters import compressed, csr, export_model
from seftkit.exporters.common import REPORT_NAME, target_weights

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
    with pytest.raises(Exception, match="model.embed_tokens.weight is not a sparse weight"):
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
    packed = export_model(llama_24_dir, "csr", tmp_path / "nm", nm_layout=True)
    manifest = json.loads((tmp_path / "nm" / csr.MANIFEST_NAME).read_text())
    layouts = [e["layout"] for e in manifest["tensors"].values() if e["layout"] != csr.DENSE]
    assert layouts == [csr.NM24] * packed.targets and packed.layout.startswith("csr+nm24 (14 of 14")
    assert_same_weights(llama_24_dir, csr.load_model(tmp_path / "nm"))
    assert packed.export_bytes < plain.export_bytes
    name = "model.layers.0.mlp.down_proj.weight"
    weight = load_model(llama_24_dir, with_tokenizer=False)[0].state_dict()[name]
    np.testing.assert_array_equal(csr.load_matrix(tmp_path / "nm", name).toarray(), weight.numpy())


def test_nm_layout_keeps_non_24_weights_as_csr(pruned_dir, tmp_path):
    report = export_model(pruned_dir, "csr", tmp_path / "nm", nm_layout=True)
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
