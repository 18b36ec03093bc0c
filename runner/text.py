"""How words and numbers read in what the commands print: counted nouns, durations, suggestions."""

from __future__ import annotations

import difflib


def plural(n: int, word: str) -> str:
    """`1 run`, `2 runs` (thousands separated)."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def size_text(n_bytes: float) -> str:
    """MiB below a GiB, GiB from there."""
    return mib(n_bytes) if n_bytes < 2**30 else f"{n_bytes / 2**30:,.2f} GiB"


def format_duration(seconds: float) -> str:
    """`45 s`, `3 min 05 s`, `1 h 40 min`."""
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {s:02d} s" if minutes else f"{s} s"


def did_you_mean(word: str, choices: list[str]) -> str:
    """`; did you mean 'steps'?` for the closest of `choices` to a mistyped `word`, else ``."""
    close = difflib.get_close_matches(str(word), choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
