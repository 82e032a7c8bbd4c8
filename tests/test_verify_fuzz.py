"""Untrusted files in CI: seeded fuzzing of verify's torch-free safetensors reader.

Hundreds of mutated and truncated headers, offsets, dtypes, shapes, configs and shard indexes. Every case must
end in exit 0, 1 or 2; a failure is one line on stderr with no traceback; and no tensor is ever read past the
end of its file. Cases run in process (CliRunner); sizes are chosen so that a reader which trusted a length
would allocate or loop visibly rather than pass.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable

import numpy as np
import pytest
from click.testing import CliRunner

from seftkit.cli.main import cli
from seftkit.sparsity import scanner

SEED = 20261201
HUGE = [2**31, 2**32 + 7, 2**62, 2**63, 2**64 - 1, 2**64, 2**70, 10**30]
ODD_VALUES = [None, True, False, -1, 0, 1, 1.5, "3", "", [], {}, [[1]], "F32", -(2**63), *HUGE]
DTYPES = [*scanner.DTYPES, "F4", "f32", "E8M0", "", "BF16 ", 7, None, ["F32"]]


def tensor(dtype: str, shape: list[int], rng: np.random.Generator) -> bytes:
    itemsize = scanner.DTYPES[dtype].itemsize
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * itemsize, dtype=np.uint8)
    raw[: raw.size // 2] = 0  # half zero bytes: some values are exactly zero
    return raw.tobytes()


def base_checkpoint() -> tuple[dict, bytes]:
    """A valid header (several dtypes, two decoder layers, one non-target tensor) and its data section."""
    rng = np.random.default_rng(0)
    specs = {
        "model.layers.0.mlp.up_proj.weight": ("F32", [4, 8]),
        "model.layers.0.self_attn.q_proj.weight": ("BF16", [8, 8]),
        "model.layers.1.mlp.down_proj.weight": ("F16", [8, 4]),
        "model.layers.1.self_attn.k_proj.weight": ("I8", [4, 8]),
        "model.embed_tokens.weight": ("F32", [16, 4]),
    }
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, (dtype, shape) in specs.items():
        blob = tensor(dtype, shape, rng)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    return header, data


def encode(header: object, data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length % 2**64) + raw + data


# -- mutations: each returns the bytes of model.safetensors --------------------------------------------------------


def entry_field(rng: random.Random, header: dict, data: bytes) -> bytes:
    name = rng.choice([k for k in header if k != "__metadata__"])
    key = rng.choice(["dtype", "shape", "data_offsets"])
    entry = dict(header[name])
    choice = rng.random()
    if key == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif key == "shape":
        entry["shape"] = rng.choice([
            [rng.choice(ODD_VALUES), 4], [0, rng.choice(HUGE)], [rng.choice(HUGE), 0], [rng.choice(HUGE)] * 2,
            [], [8], [2, 2, 8], list(reversed(entry["shape"])), rng.choice(ODD_VALUES)])
    elif choice < 0.5:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([
            [end, begin], [begin, end + 1], [begin - 1, end - 1], [begin, rng.choice(HUGE)],
            [rng.choice(HUGE), rng.choice(HUGE)], [-begin - 1, end], [begin + 1, end + 1], [0, len(data) + 1]])
    else:
        entry["data_offsets"] = rng.choice([rng.choice(ODD_VALUES), [rng.choice(ODD_VALUES), 8], [0, 8, 16], [0]])
    return encode({**header, name: entry}, data)


def entry_shape(rng: random.Random, header: dict, data: bytes) -> bytes:
    name = rng.choice([k for k in header if k != "__metadata__"])
    return encode({**header, name: rng.choice(ODD_VALUES)}, data)


def whole_header(rng: random.Random, header: dict, data: bytes) -> bytes:
    deep = "[" * rng.choice([50, 5_000, 200_000]) + "]" * rng.choice([0, 5_000])
    return encode(rng.choice([
        [], "text", 3, None, deep.encode(), b"{", b"\xff\xfe{}", b"{\"a\": 1e999}", b"\x00" * 16,
        ("{\"x\": " + "9" * 10_000 + "}").encode(), {"__metadata__": 1}, {}, "\u2603".encode("utf-16"),
        json.dumps(header).encode()[: rng.randrange(1, 60)]]), data)


def length_field(rng: random.Random, header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    length = rng.choice([0, 1, 2, len(raw) - 1, len(raw) + 1, len(raw) + len(data), len(raw) + len(data) + 1,
                         *HUGE, rng.randrange(2**64)])
    return encode(raw, data, length)


def truncate(rng: random.Random, header: dict, data: bytes) -> bytes:
    full = encode(header, data)
    return full[: rng.randrange(len(full))]


def flip_bytes(rng: random.Random, header: dict, data: bytes) -> bytes:
    full = bytearray(encode(header, data))
    header_end = 8 + len(json.dumps(header).encode())
    for _ in range(rng.randint(1, 8)):
        full[rng.randrange(header_end)] = rng.randrange(256)  # the length field and the JSON
    return bytes(full)


def overlap(rng: random.Random, header: dict, data: bytes) -> bytes:
    names = [k for k in header if k != "__metadata__"]
    a, b = rng.sample(names, 2)
    return encode({**header, b: {**header[b], "data_offsets": header[a]["data_offsets"]}}, data)


def zero_size(rng: random.Random, header: dict, data: bytes) -> bytes:
    """A legal empty tensor whose other dimension is absurd: nothing to read, nothing to loop over."""
    name = rng.choice([k for k in header if k.startswith("model.layers.")])
    begin = header[name]["data_offsets"][0]
    big = rng.choice([4, *HUGE])
    shape = rng.choice([[0, big], [big, 0], [0, 0], [0]])
    return encode({**header, name: {**header[name], "shape": shape, "data_offsets": [begin, begin]}}, data)


def append_garbage(rng: random.Random, header: dict, data: bytes) -> bytes:
    return encode(header, data) + rng.randbytes(rng.randint(1, 64))  # trailing bytes: still valid


MUTATIONS: list[Callable[[random.Random, dict, bytes], bytes]] = [
    entry_field, entry_field, entry_field, entry_shape, whole_header, length_field, truncate, flip_bytes,
    overlap, zero_size, append_garbage,
]


def mutated_cases(count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(SEED)
    header, data = base_checkpoint()
    cases = [("valid", encode(header, data))]
    for i in range(count):
        mutation = MUTATIONS[i % len(MUTATIONS)]
        cases.append((f"{i}-{mutation.__name__}", mutation(rng, header, data)))
    return cases


# -- the checks ----------------------------------------------------------------------------------------------------


@pytest.fixture
def bounded_reads(monkeypatch) -> list[str]:
    """Fail the case if any tensor view reaches past the end of its file (instead of trusting the header)."""
    original = scanner.MappedFiles.raw
    past_end: list[str] = []

    def checked(self, info):
        if info.offset < 0 or info.offset + info.nbytes > info.file.stat().st_size:
            past_end.append(f"{info.name}: bytes {info.offset}..{info.offset + info.nbytes} of {info.file}")
        return original(self, info)

    monkeypatch.setattr(scanner.MappedFiles, "raw", checked)
    return past_end


def check_outcome(result, where: str) -> None:
    assert result.exit_code in (0, 1, 2), f"{where}: exit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output, where
    if result.exit_code == 2:
        assert result.stdout == "", where
        assert result.stderr.startswith("seftkit: error: ") and result.stderr.count("\n") == 1, \
            f"{where}: {result.stderr!r}"
    else:
        assert result.stderr == "" and "model:" in result.stdout, f"{where}: {result.output}"


def test_fuzzed_safetensors_headers(tmp_path, bounded_reads):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    outcomes = {0: 0, 1: 0, 2: 0}
    for label, content in mutated_cases(440):
        (folder / "model.safetensors").write_bytes(content)
        args = ["--nm", "2:4"] if len(content) % 2 else ["--sparsity", "0.3"]
        result = CliRunner().invoke(cli, ["verify", str(folder), *args])
        check_outcome(result, label)
        outcomes[result.exit_code] += 1
    assert not bounded_reads, bounded_reads[:3]
    assert outcomes[2] > 250 and outcomes[0] + outcomes[1] > 10, outcomes  # both paths exercised


def shard_cases() -> list[tuple[str, object, dict[str, bytes]]]:
    """(label, index content, shard files) for sharded checkpoints."""
    header, data = base_checkpoint()
    names = [k for k in header if k != "__metadata__"]
    first = encode({k: header[k] for k in names[:2]}, data)  # offsets still point into the full data
    second = encode({"__metadata__": {}, **{k: header[k] for k in names[2:]}}, data)
    good = {"weight_map": {**dict.fromkeys(names[:2], "a.safetensors"), **dict.fromkeys(names[2:], "b.safetensors")}}
    files = {"a.safetensors": first, "b.safetensors": second}
    return [
        ("good", good, files),
        ("linked shards", good, files),
        ("missing shard", good, {"a.safetensors": first}),
        ("no weight_map", {"metadata": {}}, files),
        ("weight_map list", {"weight_map": ["a.safetensors"]}, files),
        ("int shard names", {"weight_map": {names[0]: 5, names[1]: 6}}, files),
        ("null shard name", {"weight_map": {names[0]: None}}, files),
        ("dict shard name", {"weight_map": {names[0]: {"file": "a"}}}, files),
        ("mixed shard names", {"weight_map": {names[0]: "a.safetensors", names[1]: 3}}, files),
        ("escaping shard", {"weight_map": {names[0]: "../outside.safetensors"}}, files),
        ("absolute shard", {"weight_map": {names[0]: "/etc/hostname"}}, files),
        ("shard is a folder", {"weight_map": {names[0]: "sub"}}, files),
        ("index not json", "{weight_map", files),
        ("index is a list", [1, 2], files),
        ("index deeply nested", "[" * 100_000, files),
        ("empty weight_map", {"weight_map": {}}, files),
        ("same tensor twice", {"weight_map": {names[0]: "a.safetensors", "x": "c.safetensors"}},
         {**files, "c.safetensors": first}),
        ("corrupt shard", good, {**files, "b.safetensors": second[:50]}),
    ]


@pytest.mark.parametrize("index", range(len(shard_cases())), ids=[case[0] for case in shard_cases()])
def test_fuzzed_shard_indexes(index, tmp_path, bounded_reads):
    label, content, files = shard_cases()[index]
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "outside.safetensors").write_bytes(files["a.safetensors"])
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / scanner.INDEX_FILE).write_text(content if isinstance(content, str) else json.dumps(content))
    for name, blob in files.items():
        if label == "linked shards":  # the Hugging Face cache layout: snapshot files link to ../blobs
            (tmp_path / "blobs").mkdir(exist_ok=True)
            (tmp_path / "blobs" / name).write_bytes(blob)
            (folder / name).symlink_to(tmp_path / "blobs" / name)
        else:
            (folder / name).write_bytes(blob)
    result = CliRunner().invoke(cli, ["verify", str(folder), "--sparsity", "0.3"])
    check_outcome(result, label)
    assert not bounded_reads
    if label in ("good", "linked shards"):
        assert "(llama, 2 file(s), 4 targeted weights)" in result.stdout
    elif label in ("escaping shard", "absolute shard"):
        assert result.exit_code == 2 and "outside the model folder" in result.stderr, result.stderr


@pytest.mark.parametrize("config", ["[1, 2]", "null", '"llama"', "{", "[" * 100_000, '{"model_type": 3}',
                                    '{"model_type": ["gpt2"]}', "\xff"])
def test_fuzzed_config_json(config, tmp_path):
    header, data = base_checkpoint()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(encode(header, data))
    (folder / "config.json").write_bytes(config.encode("latin-1"))
    check_outcome(CliRunner().invoke(cli, ["verify", str(folder)]), config[:20])


def test_a_header_length_past_the_end_is_refused_before_reading(tmp_path, monkeypatch):
    """Bounded work per case without timing: the header is never read when its length exceeds the file."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    asked: list[int] = []
    real_open = open

    class Recorder:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            asked.append(n)
            return self.f.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Recorder(real_open(p, mode, *a, **k))
                        if str(p) == str(path) else real_open(p, mode, *a, **k))
    result = CliRunner().invoke(cli, ["verify", str(path)])
    assert result.exit_code == 2 and "exceeds the file size" in result.stderr
    assert asked == [8]  # only the length field was read


def test_fuzz_cases_are_deterministic():
    assert mutated_cases(50) == mutated_cases(50)
    assert len({content for _, content in mutated_cases(440)}) > 250  # mostly distinct cases
