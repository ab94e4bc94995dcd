"""Numbers in sentences an operator reads (status, logs)."""

from __future__ import annotations


def counted(number: int, noun: str) -> str:
    """`1 alias`, `2 aliases`, `0 domains`."""
    plural = noun + ("es" if noun.endswith("s") else "s")
    return f"{number} {noun if number == 1 else plural}"
