"""Errors a user can act on.

Anything raised as :class:`SeftkitError` reaches the CLI as one line on stderr and exit code 2, with no
traceback: the message must say what was wrong with the input and, where possible, how to fix it.
Everything else is a bug: the CLI reports it in one line with exit code 3, and with its traceback under
``seftkit --debug`` or ``SEFTKIT_DEBUG=1``.
"""

from __future__ import annotations


class SeftkitError(Exception):
    """Bad input or an unrecoverable condition the user caused or can fix (CLI exit code 2)."""

    exit_code = 2


class DivergenceError(SeftkitError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line reports
    of errors raised by other libraries."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
