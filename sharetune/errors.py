"""An exception in one line, for the one-line messages sharetune answers with (no tracebacks)."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of the exception's message ("" when it has none): what a one-line error quotes."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""
