"""Which weights count: one rule, applied to parameter names, so verify (torch-free, on safetensors
names) and prune/repair (on modules) select the same tensors.

Default: 2-D ``*.weight`` tensors inside numbered decoder blocks (``...layers.3...``, ``h.3``), excluding
embeddings, ``lm_head`` and norms. ``include``/``exclude`` are regular expressions searched in the name;
``include`` replaces the default rule (still 2-D weights only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from seftkit.errors import SeftkitError

_BLOCK_RE = re.compile(r"(?:^|\.)(\d+)\.")
_NEVER_DEFAULT = re.compile(r"(embed|wte|wpe|lm_head|norm|(^|\.)ln_)", re.IGNORECASE)

# Model types whose linear weights are stored [in, out] (GPT-2's Conv1D) instead of nn.Linear's [out, in].
TRANSPOSED_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})


def _compile(pattern: str | None, flag: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise SeftkitError(f"bad {flag} regular expression {pattern!r}: {exc}") from None


@dataclass(frozen=True)
class TargetRule:
    include: str | None = None
    exclude: str | None = None

    def __post_init__(self) -> None:
        _compile(self.include, "--include")
        _compile(self.exclude, "--exclude")

    def matches(self, name: str, ndim: int) -> bool:
        if ndim != 2 or not name.endswith("weight"):
            return False
        include = _compile(self.include, "--include")
        exclude = _compile(self.exclude, "--exclude")
        if include is not None:
            selected = include.search(name) is not None
        else:
            selected = _BLOCK_RE.search(name) is not None and _NEVER_DEFAULT.search(name) is None
        return selected and not (exclude is not None and exclude.search(name))


def layer_index(name: str) -> int | None:
    """The decoder block a parameter belongs to (first number in its dotted name), if any."""
    match = _BLOCK_RE.search(name)
    return int(match.group(1)) if match else None
