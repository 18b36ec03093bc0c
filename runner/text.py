"""How numbers read in what the commands print: counted nouns and durations."""

from __future__ import annotations


def plural(n: int, word: str) -> str:
    """`1 run`, `2 runs` (thousands separated)."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def format_duration(seconds: float) -> str:
    """`45 s`, `3 min 05 s`, `1 h 40 min`."""
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {s:02d} s" if minutes else f"{s} s"
