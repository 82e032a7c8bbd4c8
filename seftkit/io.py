"""Atomic output folders and JSON reports.

Every command that writes a model builds it in a temporary sibling folder and renames it into place only
when it is complete, so a crash, Ctrl-C or bad input never leaves a half-written model and never touches
the input. The temp folder lives next to the destination so the final rename stays on one filesystem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from seftkit.errors import SeftkitError


def check_output_path(out: str | os.PathLike, overwrite: bool, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an existing output (unless ``overwrite``) and any output that is one of the inputs."""
    out_path = Path(out).expanduser().resolve()
    for src in inputs:
        if src and Path(src).expanduser().exists() and Path(src).expanduser().resolve() == out_path:
            raise SeftkitError(f"output {out} is the input model; choose another --out")
    if out_path.exists() and not overwrite:
        raise SeftkitError(f"output {out} already exists; pass --overwrite to replace it")
    parent = out_path.parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise SeftkitError(f"output folder {parent} is not writable")
    return out_path


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder that becomes ``out`` only if the block finishes without an exception."""
    out_path = check_output_path(out, overwrite)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SeftkitError(f"cannot create output folder {out_path.parent}: {exc.strerror}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a finished model folder gets the usual mode
        yield tmp
        replace_dir(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dest: Path) -> None:
    """Move a finished folder into place; an existing ``dest`` is renamed aside first, then removed."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(src, dest)
    except OSError:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; it replaces ``path`` on success, so no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; an output gets the usual mode
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, report: Any) -> Path:
    """Write a report (dict or dataclass) as JSON, atomically (temp file + rename)."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(_jsonable(report), f, indent=2, sort_keys=False)
        f.write("\n")
    return Path(path)
