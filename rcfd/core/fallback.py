"""The fast paths' way of failing: one line that names the error and the switch.

A compiled training step or a CUDA-graph-captured sampler that raises falls back to the eager
path (DESIGN.md: a fast path never ends a run). What it logs is written here once, so every
fast path reports the same way: what failed, why (the first line of the error) and how to
turn that fast path off.
"""

from __future__ import annotations

MAX_REASON = 300  # characters of the error kept in the line


def reason(exc: BaseException) -> str:
    """``"<ErrorType>: <first line of its message>"``, at most :data:`MAX_REASON` characters
    (compiler errors run to pages; the line must stay one line)."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def fallback_message(what: str, exc: BaseException, switch: str) -> str:
    """The one line a failed fast path logs: ``what`` failed, the error, the eager path
    taken, and ``switch`` (how to turn the fast path off)."""
    return f"{what} failed ({reason(exc)}); continuing on the eager path (turn it off with {switch})"
