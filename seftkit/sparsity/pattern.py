"""Sparsity patterns as the user states them, validated once for every command.

N:M follows Wanda's convention: in every group of M consecutive input weights of a row, *at least N are
zero* (so 2:4 keeps 2 of 4, 1:4 keeps 3 of 4). M must divide the input width of every targeted weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from seftkit.errors import SeftkitError

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(text: str) -> tuple[int, int]:
    """Parse ``"N:M"`` into ``(n, m)`` with ``0 < n < m``."""
    match = _NM_RE.match(text or "")
    if not match:
        raise SeftkitError(f"bad N:M pattern {text!r}: expected two integers like 2:4")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise SeftkitError(f"bad N:M pattern {text!r}: need 0 < N < M (N zeros in every M weights)")
    return n, m


def check_sparsity(value: float) -> float:
    """Sparsity is a fraction of zeros in [0, 1)."""
    if value != value or not 0.0 <= value < 1.0:  # NaN-safe
        raise SeftkitError(f"sparsity must be in [0, 1), got {value}")
    return float(value)


@dataclass(frozen=True)
class SparsityPattern:
    """Either unstructured (``sparsity`` fraction of zeros) or N:M (``n`` zeros in every ``m``)."""

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def fraction(self) -> float:
        """Fraction of zeros the pattern demands."""
        return self.n / self.m if self.is_nm else float(self.sparsity or 0.0)

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:.0%} unstructured"

    def check_width(self, name: str, in_features: int) -> None:
        """N:M needs M to divide the input width."""
        if self.is_nm and in_features % self.m:
            raise SeftkitError(
                f"N:M {self.n}:{self.m} does not fit {name}: input width {in_features} is not a multiple of {self.m}"
            )


def parse_pattern(sparsity: float | None = None, nm: str | None = None) -> SparsityPattern:
    """Build a pattern from the CLI's ``--sparsity`` / ``--nm`` (exactly one of them)."""
    if nm is not None and sparsity is not None:
        raise SeftkitError("give either --sparsity or --nm, not both")
    if nm is not None:
        n, m = parse_nm(nm)
        return SparsityPattern(n=n, m=m)
    if sparsity is None:
        raise SeftkitError("give --sparsity S or --nm N:M")
    return SparsityPattern(sparsity=check_sparsity(sparsity))
