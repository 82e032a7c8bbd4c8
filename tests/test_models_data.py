"""The foundation: model loading and its errors, the built-in conversion, atomic outputs, offline data."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import FAMILIES, make_tiny_model, make_tokenizer, save_tiny_model
from safetensors.torch import load_file

from seftkit import data, models
from seftkit.errors import SeftkitError
from seftkit.io import atomic_dir, check_output_path, write_json
from seftkit.sparsity.targets import layer_index

# --- load_model ---------------------------------------------------------------------------------------------


def test_load_model_is_quiet_and_ready(llama_dir, capfd):
    model, tokenizer = models.load_model(llama_dir)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token is not None
    assert "Loading weights" not in capfd.readouterr().err
    bf16, none = models.load_model(llama_dir, dtype="bf16", with_tokenizer=False)
    assert next(bf16.parameters()).dtype == torch.bfloat16 and none is None


def test_every_rank_loads_real_weights_under_an_accelerate_fsdp_launch(llama_dir, monkeypatch):
    """accelerate's GPU launcher asks transformers for empty weights on all ranks but the first; seftkit loads the
    checkpoint on every rank instead (nothing broadcasts rank 0's weights), and leaves the setting as it was."""
    from transformers import AutoModelForCausalLM

    seen = []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: seen.append(os.environ[models.CPU_RAM_EFFICIENT_LOADING])
                        or load(*args, **kwargs))
    monkeypatch.setenv(models.CPU_RAM_EFFICIENT_LOADING, "true")
    models.load_model(llama_dir, with_tokenizer=False)
    assert seen == ["false"] and os.environ[models.CPU_RAM_EFFICIENT_LOADING] == "true"


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_and_linear_views(family):
    model, _ = make_tiny_model(family)
    _, layers = models.find_decoder_layers(model)
    assert len(layers) == 2
    linears = models.find_linears(layers[0], prefix="model.layers.0.")
    assert len(linears) == {"gpt2": 4, "opt": 6}.get(family, 7)
    for module in linears.values():  # an [out, in] view whatever the storage, and writes reach the parameter
        view = models.linear_weight(module)
        with torch.no_grad():
            view[1, 0] = 0.0
            x = torch.randn(3, view.shape[1])
            bias = module.bias if module.bias is not None else 0
            assert torch.allclose(module(x) - bias, x @ view.T, atol=1e-5)
        assert int((module.weight == 0).sum()) == 1
    in_blocks = {n for n, m in model.named_modules() if models.is_linear(m) and layer_index(n + ".") is not None}
    assert set(models.target_linears(model)) == in_blocks


def test_load_model_errors(llama_dir, tmp_path):
    with pytest.raises(SeftkitError, match=r"model path nope does not exist \(built-in models: smollm2-135m\)"):
        models.load_model("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeftkitError, match="is not a Hugging Face model folder \\(no config.json\\)"):
        models.load_model(tmp_path / "empty")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(llama_dir / "config.json", no_weights)
    with pytest.raises(SeftkitError, match="has no weights"):
        models.load_model(no_weights)


def test_pickle_weights_need_allow_pickle(llama_dir, tmp_path):
    folder = shutil.copytree(llama_dir, tmp_path / "m")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(SeftkitError, match="stores weights as pickle \\(pytorch_model.bin\\).*--allow-pickle"):
        models.load_model(folder)
    model, _ = models.load_model(folder, allow_pickle=True, with_tokenizer=False)
    reference, _ = models.load_model(llama_dir, with_tokenizer=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                 strict=True))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_one_line(llama_dir, tmp_path, damage):
    folder = shutil.copytree(llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100] if damage == "truncate" else b"garbage!")
    with pytest.raises(SeftkitError, match="corrupt or truncated safetensors in") as info:
        models.load_model(folder)
    assert "\n" not in str(info.value)


def test_device_and_dtype_errors():
    with pytest.raises(SeftkitError, match="unknown dtype 'int4'"):
        models.resolve_dtype("int4")
    assert models.resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_device_follows_cuda_availability(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert models.resolve_device("auto") == ("cuda" if cuda else "cpu")
    assert models.resolve_device("cpu") == "cpu"
    if cuda:
        assert models.resolve_device("cuda:1") == "cuda:1"
    else:
        with pytest.raises(SeftkitError, match="--device cuda requested but CUDA is not available"):
            models.resolve_device("cuda:0")


def test_check_finite(llama_dir):
    model, _ = models.load_model(llama_dir, with_tokenizer=False)
    models.check_finite(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SeftkitError, match="model.layers.1.mlp.up_proj.weight contains NaN"):
        models.check_finite(model)


def test_model_type(llama_dir, tmp_path):
    assert models.model_type(llama_dir) == "llama"
    assert models.model_type(tmp_path) == ""


# --- the built-in model: converted once, atomically ---------------------------------------------------------


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """Point the cache at tmp_path and replace the GGUF conversion with a tiny model writer that counts calls."""
    monkeypatch.setenv("SEFTKIT_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []

    def convert(gguf_dir, gguf_file, out):
        calls.append(Path(out))
        assert (Path(gguf_dir) / gguf_file).is_file()
        save_tiny_model(Path(out), "llama")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def test_builtin_is_converted_once(fake_conversion, tmp_path):
    path = models.resolve_model_path("smollm2-135m")
    assert path == tmp_path / "cache" / "smollm2-135m-instruct" and (path / "config.json").is_file()
    assert models.resolve_model_path("smollm2-135m") == path
    assert len(fake_conversion) == 1
    assert fake_conversion[0].parent == path.parent and not fake_conversion[0].exists()  # temp folder moved
    assert sorted(p.name for p in path.parent.iterdir()) == ["smollm2-135m-instruct"]
    model, _ = models.load_model("smollm2-135m", with_tokenizer=False)
    assert model.config.model_type == "llama"


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SEFTKIT_CACHE", str(tmp_path / "cache"))

    def broken(gguf_dir, gguf_file, out):
        (Path(out) / "config.json").write_text("{}")  # half-written, then the conversion dies
        raise RuntimeError("conversion crashed")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="conversion crashed"):
        models.resolve_model_path("smollm2-135m")
    assert list((tmp_path / "cache").iterdir()) == []


def test_losing_the_conversion_race_is_fine(tmp_path, monkeypatch):
    monkeypatch.setenv("SEFTKIT_CACHE", str(tmp_path / "cache"))
    final = tmp_path / "cache" / "smollm2-135m-instruct"

    def slow(gguf_dir, gguf_file, out):  # another process finishes first while we are converting
        save_tiny_model(final, "llama", seed=1)
        save_tiny_model(Path(out), "llama", seed=2)

    monkeypatch.setattr(models, "_convert_gguf", slow)
    assert models.resolve_model_path("smollm2-135m") == final
    assert sorted(p.name for p in final.parent.iterdir()) == ["smollm2-135m-instruct"]
    winner = load_file(str(final / "model.safetensors"))
    expected = load_file(str(save_tiny_model(tmp_path / "seed1", "llama", seed=1) / "model.safetensors"))
    assert all(torch.equal(winner[k], expected[k]) for k in expected)


def test_stale_cache_folder_is_a_clear_error(fake_conversion, tmp_path):
    final = tmp_path / "cache" / "smollm2-135m-instruct"
    final.mkdir(parents=True)
    (final / "leftover").write_text("an interrupted copy, no config.json")
    with pytest.raises(SeftkitError, match=f"cannot move the converted smollm2-135m into {final} .*remove that"):
        models.resolve_model_path("smollm2-135m")
    assert sorted(p.name for p in final.parent.iterdir()) == ["smollm2-135m-instruct"]


# --- atomic outputs -----------------------------------------------------------------------------------------


def test_atomic_dir(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError), atomic_dir(out) as tmp:
        (tmp / "half").write_text("x")
        raise ValueError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "done").write_text("1")
    assert (out / "done").read_text() == "1"
    with pytest.raises(SeftkitError, match="already exists; pass --overwrite"), atomic_dir(out):
        pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "done").write_text("2")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "done").read_text() == "2"
    with pytest.raises(SeftkitError, match="is the input model"):
        check_output_path(out, overwrite=True, inputs=(str(out),))


def test_write_json_dataclass_and_nonfinite(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Report:
        path: Path
        value: float

    path = write_json(tmp_path / "sub" / "r.json", Report(Path("/x"), float("nan")))
    assert json.loads(path.read_text()) == {"path": "/x", "value": None}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


# --- data ---------------------------------------------------------------------------------------------------


def test_text_jsonl_and_arrow_readers(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\n\n second doc \n\n")
    assert data.load_texts(str(tmp_path / "a.txt")) == ["first doc\nstill first", "second doc"]

    rows = [{"text": "alpha", "label": 1}, {"text": "beta", "label": 0}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "r.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(tmp_path / "r.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "saved").mkdir()
    with pa.OSFile(str(tmp_path / "saved" / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    for name in ("r.jsonl", "r.jsonl.gz", "r.arrow", "saved"):
        assert data.load_records(str(tmp_path / name)) == rows, name
    assert data.load_texts(str(tmp_path / "r.arrow")) == ["alpha", "beta"]


def test_data_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(SeftkitError, match="bad.jsonl:2 is not valid JSON"):
        data.load_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nofield.jsonl").write_text('{"question": "why"}\n')
    with pytest.raises(SeftkitError, match="has no 'text' field \\(fields: question\\)"):
        data.load_texts(str(tmp_path / "nofield.jsonl"))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(SeftkitError, match="contains no text"):
        data.load_texts(str(tmp_path / "blank.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SeftkitError, match="is not UTF-8 text"):
        data.load_texts(str(tmp_path / "latin1.txt"))
    (tmp_path / "broken.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(SeftkitError, match="cannot read Arrow data"):
        data.load_records(str(tmp_path / "broken.arrow"))
    with pytest.raises(SeftkitError, match="data .*missing.txt does not exist"):
        data.load_records(str(tmp_path / "missing.txt"))
    for spec in ("olmo:nope", "olmo:piqa:test:x"):
        with pytest.raises(SeftkitError, match="unknown built-in data"):
            data.load_records(spec)
    with pytest.raises(SeftkitError, match="unknown split 'test'"):
        data.load_records("olmo:piqa:test")


def test_split_records_disjoint_and_stable():
    records = [{"id": i, "text": f"passage {i}"} for i in range(400)]
    train = data.split_records(records, "train", key_field="text")
    heldout = data.split_records(records, "heldout", key_field="text")
    assert sorted(r["id"] for r in train + heldout) == list(range(400))
    assert 20 <= len(heldout) <= 60  # about 10%
    shuffled = list(reversed(records)) + [{"id": 999, "text": "new"}]  # membership is per item, not per position
    assert {r["id"] for r in data.split_records(shuffled, "heldout", key_field="text")} - {999} == \
        {r["id"] for r in heldout}
    assert data.split_records(records, None) is records


def test_builtin_lambada_split():
    train, heldout = data.load_texts("olmo:lambada:train"), data.load_texts("olmo:lambada:heldout")
    assert not set(train) & set(heldout)
    assert len(train) + len(heldout) == len(data.load_texts("olmo:lambada"))
    assert data.load_records("olmo:piqa")[0].keys() >= {"goal", "sol1", "sol2", "label"}


def test_token_windows(tiny_text_file):
    tokenizer = make_tokenizer()
    texts = data.load_texts(str(tiny_text_file))
    ids = data.tokenize_corpus(tokenizer, texts)
    windows = data.token_windows(tokenizer, texts, seqlen=16, nsamples=5, seed=3)
    assert windows.shape == (5, 16) and windows.dtype == torch.long
    assert torch.equal(windows, data.token_windows(tokenizer, texts, seqlen=16, nsamples=5, seed=3))
    assert not torch.equal(windows, data.token_windows(tokenizer, texts, seqlen=16, nsamples=5, seed=4))
    corpus = ids.tolist()
    for row in windows.tolist():  # each window is a contiguous slice of the corpus
        assert any(corpus[s : s + 16] == row for s in range(len(corpus) - 15))
    ordered = data.token_windows(tokenizer, texts, seqlen=16, random=False)
    assert ordered.shape == (ids.numel() // 16, 16) and torch.equal(ordered.flatten(), ids[: ordered.numel()])
    assert data.token_windows(tokenizer, texts, seqlen=16, nsamples=3, random=False).shape == (3, 16)
    with pytest.raises(SeftkitError, match=f"data has {ids.numel()} tokens, fewer than seqlen 100000"):
        data.token_windows(tokenizer, texts, seqlen=100_000)
    with pytest.raises(SeftkitError, match="seqlen must be at least 2"):
        data.token_windows(tokenizer, texts, seqlen=1)


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f.txt").write_text("x")
        report = write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert report.stat().st_mode & 0o777 == 0o644


# --- models people already have: a .gguf file, a hub id in the local Hugging Face cache ---------------------


def write_tiny_gguf(path: Path) -> torch.nn.Module:
    """The tiny Llama written as llama.cpp writes GGUFs (its names, q/k rows permuted for its rotary layout, the
    BPE vocabulary and merges); returns the model whose weights the file holds."""
    import gguf

    def permute(weight: np.ndarray, heads: int) -> np.ndarray:
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    model, tokenizer = make_tiny_model("llama")
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].__getitem__)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3 if token == "<eos>" else 1 for token in tokens])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    for add in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_pad_token_id):
        add(tokenizer.eos_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(config.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{ours}.weight" for hf, ours in parts.items()})
    for name, tensor in model.state_dict().items():
        weight = tensor.numpy()
        if ".q_proj." in name or ".k_proj." in name:
            weight = permute(weight, config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads)
        writer.add_tensor(names[name], np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_a_gguf_file_is_converted_once_and_loads_its_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SEFTKIT_CACHE", str(tmp_path / "cache"))
    expected = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = models.load_model(tmp_path / "tiny.gguf")
    got = model.state_dict()
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.state_dict().items())
    assert tokenizer("the quick brown fox").input_ids == make_tokenizer()("the quick brown fox").input_ids
    converted = models.resolve_model_path(tmp_path / "tiny.gguf")
    assert converted.parent == tmp_path / "cache" / "gguf" and converted.name.startswith("tiny-")
    monkeypatch.setattr(models, "_convert_gguf", None)  # a second conversion would fail
    assert models.resolve_model_path(str(tmp_path / "tiny.gguf")) == converted


def test_a_damaged_gguf_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SEFTKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(SeftkitError, match="cannot convert .*bad.gguf from GGUF"):
        models.resolve_model_path(tmp_path / "bad.gguf")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def fake_hf_cache(home: Path, repo_id: str, source: Path) -> Path:
    """Lay ``source``'s files out as huggingface_hub caches a download of ``repo_id`` under ``home``."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_a_hub_id_resolves_from_the_local_cache_only(llama_dir, tiny_text_file, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from seftkit.cli.main import cli

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    snapshot = fake_hf_cache(tmp_path / "hf", "someone/tiny-llama", llama_dir)
    assert models.resolve_model_path("someone/tiny-llama") == snapshot
    runner = CliRunner()
    result = runner.invoke(cli, ["prune", "someone/tiny-llama", "--method", "magnitude", "--sparsity", "0.5",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["prune", "someone/absent", "--method", "magnitude", "--sparsity", "0.5",
                                 "--out", str(tmp_path / "out2")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "someone/absent is not a local path, a built-in model or a model in the local Hugging Face cache" in (
        result.output)
    assert not (tmp_path / "out2").exists()
