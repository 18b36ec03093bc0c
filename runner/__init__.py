"""Lil Gatsby: train a tiny GPT-2 on The Great Gatsby and record every step, one run or a sweep.

The entry points of analysis are importable from here: `from runner import load_index,
load_metrics, open_recording, token_ids, token_rows` (pandas is imported when one is first used,
not by every `import runner`).
Importing the package prepares OpenMP's wait policy before any of its modules loads torch
(`runner.cpus`).
"""

from __future__ import annotations

from typing import Any

from runner.cpus import prepare_openmp

prepare_openmp()

_PUBLIC = {"load_index": "runner.runs.index", "load_metrics": "runner.analysis.metrics",
           "open_recording": "runner.recording.rows", "token_ids": "runner.analysis.tokens",
           "token_rows": "runner.analysis.tokens"}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
