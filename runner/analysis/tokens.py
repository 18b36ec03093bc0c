"""Per-token analysis: which tokens of a run are dead, and what each token's row does, step by step.

`token_ids(run)` says which tokens never occur in the run's book; `token_rows(run, ...)` gives, for
chosen tokens (all, or the dead ones by default) and every recorded step, each row's norm, its
cosine with its own initial row (how far it turned) and with the mean of the dead rows at that step
(how close it is to their common direction), as a long table. Both read through the one recording
reader (`runner.open_recording`): either format, a run directory on a disk or in a bucket, in
chunks of rows (bounded memory). docs/analysis.md shows them in use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from runner.recording.format import experiment_of, recorded_steps
from runner.recording.rows import open_recording
from runner.storage.location import Location

CHUNK_ROWS = 256


def token_ids(run: str | Path | Location) -> dict[str, list[int]]:
    """{"dead": [...], "live": [...]}: the token ids that never occur in the run's (cleaned) book,
    and those that do, from its recording's metadata."""
    with open_recording(run) as f:
        counts = json.loads(f.metadata["token_counts"])
    return {"dead": [i for i, c in enumerate(counts) if c == 0], "live": [i for i, c in enumerate(counts) if c]}


def token_label(token: int) -> str:
    """A token's character as Python writes it in a string (`a`, `\\n`, `\\x00`)."""
    return repr(chr(token))[1:-1]


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def token_rows(run: str | Path | Location, tokens: Sequence[int] | None = None, tensor: str = "W",
               steps: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per (recorded step, token): `step`, `token`, `char`, `dead`, `norm` (of the token's
    row of `tensor`), `cosine_initial` (with its row at step 0) and `cosine_dead_mean` (with the
    mean of the dead tokens' rows at that step; NaN without dead tokens). `tokens`: default the dead
    ones; `steps`: recorded steps to keep (default all). `tensor`: any per-step matrix of the
    recording (`W`, `grads`, `momentum`, `variance`; `E`, ... when untied)."""
    with open_recording(run) as f:
        exp = experiment_of(f.metadata)
        counts = json.loads(f.metadata["token_counts"])
        dead = [i for i, c in enumerate(counts) if c == 0]
        chosen = list(dead if tokens is None else tokens)
        if tensor not in f.tensors or len(f.tensors[tensor]["shape"]) != 3:
            matrices = [n for n, info in f.tensors.items() if len(info["shape"]) == 3]
            raise ValueError(f"{tensor!r}: not a per-step matrix of this recording ({', '.join(matrices)})")
        recorded = list(recorded_steps(exp.train.steps, exp.record.every))
        wanted = set(recorded if steps is None else steps)
        initial = _unit(f.rows(tensor, 0, 1)[0, chosen])
        tables = []
        for start in range(0, len(recorded), CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, len(recorded))
            keep = [i for i in range(stop - start) if recorded[start + i] in wanted]
            if not keep:
                continue
            block = f.rows(tensor, start, stop)[keep]
            rows = block[:, chosen]
            dead_mean = _unit(block[:, dead].mean(axis=1)) if dead else np.full(block.shape[::2], np.nan)
            tables.append(pd.DataFrame({
                "step": np.repeat([recorded[start + i] for i in keep], len(chosen)),
                "token": np.tile(chosen, len(keep)),
                "norm": np.linalg.norm(rows, axis=2).ravel(),
                "cosine_initial": (_unit(rows) * initial[None]).sum(axis=2).ravel(),
                "cosine_dead_mean": (_unit(rows) * dead_mean[:, None]).sum(axis=2).ravel()}))
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["step", "token", "norm", "cosine_initial", "cosine_dead_mean"])
    table.insert(2, "char", [token_label(t) for t in table["token"]])
    table.insert(3, "dead", table["token"].isin(dead))
    return table
