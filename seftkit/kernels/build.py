"""Build the native CPU kernels once and pick the instruction set they run with.

The C++ sources compile at first use with ``torch.utils.cpp_extension.load`` (ninja from PyPI) into
``$SEFTKIT_CACHE/kernels/<hash>``; the hash covers the sources, the flags and the torch version, so an
upgrade rebuilds instead of loading a stale binary, and every later process loads the cached ``.so``.
A failed build is never fatal: callers get ``None`` plus one warning and fall back to dense torch.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

from seftkit.errors import SeftkitError, first_line

SOURCES = ("bitmap_spmm.cpp",)
_CFLAGS = ("-O3", "-fopenmp")
_LDFLAGS = ("-fopenmp",)  # resolves to the libgomp torch already loaded (same soname), one thread pool
ISA_ENV = "SEFTKIT_KERNEL_ISA"

log = logging.getLogger(__name__)


class Isa(enum.IntEnum):
    """Kernel code paths, best last (the numbers match ``csrc/bitmap_spmm.cpp``)."""

    PORTABLE = 0
    AVX2 = 1
    AVX512 = 2
    AVX512_BF16 = 3


def source_dir() -> Path:
    return Path(__file__).with_name("csrc")


def build_dir() -> Path:
    """Where the compiled extension is cached, keyed by what would change the binary."""
    import torch

    from seftkit.models import cache_dir

    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((source_dir() / name).read_bytes())
    digest.update(" ".join((*_CFLAGS, *_LDFLAGS, torch.__version__)).encode())
    return cache_dir() / "kernels" / digest.hexdigest()[:16]


def _compile() -> ModuleType:
    from torch.utils import cpp_extension

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"seftkit_kernels_{folder.name}"
    if not (folder / f"{name}.so").is_file():
        log.info("compiling seftkit's sparse CPU kernels into %s (once; a minute or two)", folder)
    return cpp_extension.load(
        name=name,
        sources=[str(source_dir() / source) for source in SOURCES],
        extra_cflags=list(_CFLAGS),
        extra_ldflags=list(_LDFLAGS),
        build_directory=str(folder),
        verbose=False,
    )


@functools.cache
def native() -> ModuleType | None:
    """The compiled kernel module, or ``None`` (with one warning) when it cannot be built here."""
    try:
        return _compile()
    except Exception as exc:  # a compiler, ninja or linker failure must not take the model down
        warnings.warn(f"seftkit: native sparse kernels unavailable ({first_line(exc)}); using dense torch instead",
                      RuntimeWarning, stacklevel=2)
        return None


def parse_isa(name: str) -> Isa:
    try:
        return Isa[name.strip().upper().replace("-", "_")]
    except KeyError:
        choices = ", ".join(level.name.lower() for level in Isa)
        raise SeftkitError(f"unknown kernel ISA {name!r}: use one of {choices}") from None


def kernel_isa(requested: Isa | str | None = None) -> Isa:
    """The code path to run: the best this CPU supports, capped by ``requested`` or ``$SEFTKIT_KERNEL_ISA``.

    Asking for more than the CPU has (say AVX-512 on an AVX2 machine) warns and uses what it has.
    """
    module = native()
    supported = Isa(module.cpu_isa()) if module is not None else Isa.PORTABLE
    requested = requested if requested is not None else os.environ.get(ISA_ENV)
    if requested is None:
        return supported
    wanted = parse_isa(requested) if isinstance(requested, str) else Isa(requested)
    if wanted > supported:
        warnings.warn(f"seftkit: this CPU lacks {wanted.name.lower()}; using {supported.name.lower()} kernels",
                      RuntimeWarning, stacklevel=2)
        return supported
    return wanted
