"""`lilgatsby compare A B`: how two recordings differ, tensor by tensor, to the last bit.

Streams both files in chunks of rows (`rows.RowReader`), so memory stays bounded on 1 GB files.
For each tensor: identical or not, the largest absolute and relative difference, the largest
difference in units in the last place of its dtype, and the first row (and step) that differs;
then whether the full-precision parameters are identical at the start and the end (by their
SHA-256 in the metadata: the recorded `W` is bf16), and the config and metadata keys whose values
differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runner.config import RECORDED_TENSORS
from runner.layout import recording_of
from runner.recording.format import PARAMETER_FINGERPRINTS
from runner.recording.rows import RowReader, as_fp32
from runner.runs.index import flatten_config
from runner.storage.location import Location, at

CHUNK_ROWS = 64
# Metadata: SHA-256 of every parameter as training held it (full precision), before the first
# update and after the last; recordings made before they were written have neither.


@dataclass
class TensorDiff:
    name: str
    dtype: str
    shape: tuple[int, ...]
    problem: str | None = None  # the tensors cannot be compared value by value (absent, shape, dtype)
    differing: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    max_ulp: int = 0
    first_row: int | None = None

    @property
    def identical(self) -> bool:
        return self.problem is None and self.differing == 0


def _ordered(bits: np.ndarray, width: int) -> np.ndarray:
    """Floating-point bit patterns as integers in the order of their values, so that the difference
    of two is their distance in units in the last place (+0 and -0 coincide)."""
    bits = bits.astype(np.int64)
    sign, magnitude = bits >> (width - 1), bits & ((1 << (width - 1)) - 1)
    return np.where(sign == 1, -magnitude, magnitude)


def compare_tensor(a: RowReader, b: RowReader, name: str) -> TensorDiff:
    info_a, info_b = a.tensors.get(name), b.tensors.get(name)
    if info_a is None or info_b is None:
        only, info = ("A", info_a) if info_a is not None else ("B", info_b)
        assert info is not None  # `name` comes from one of the two headers
        return TensorDiff(name, info["dtype"], tuple(info["shape"]), problem=f"only in {only}")
    diff = TensorDiff(name, info_a["dtype"], tuple(info_a["shape"]))
    if (info_a["dtype"], info_a["shape"]) != (info_b["dtype"], info_b["shape"]):
        diff.problem = f"{info_a['dtype']}{info_a['shape']} vs {info_b['dtype']}{info_b['shape']}"
        return diff
    rows, width = (diff.shape[0] if diff.shape else 1), 16 if diff.dtype == "BF16" else 32
    for start in range(0, rows, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, rows)
        bits_a, bits_b = a.bits(name, start, stop), b.bits(name, start, stop)
        unequal = bits_a != bits_b
        rows_differ = unequal.reshape(stop - start, -1).any(axis=1)
        if not rows_differ.any():
            continue
        if diff.first_row is None:
            diff.first_row = start + int(np.argmax(rows_differ))
        values_a, values_b = as_fp32(bits_a).astype(np.float64), as_fp32(bits_b).astype(np.float64)
        delta = np.abs(values_a - values_b)
        scale = np.maximum(np.abs(values_a), np.abs(values_b))
        diff.differing += int(unequal.sum())
        diff.max_abs = max(diff.max_abs, float(np.nanmax(delta)))
        diff.max_rel = max(diff.max_rel, float(np.nanmax(np.divide(delta, scale, out=np.zeros_like(delta),
                                                                   where=scale > 0))))
        diff.max_ulp = max(diff.max_ulp, int(np.abs(_ordered(bits_a, width) - _ordered(bits_b, width)).max()))
    return diff


ABSENT = object()


def _differing_keys(a: dict, b: dict) -> list[tuple[str, object, object]]:
    return [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, ABSENT) != b.get(k, ABSENT)]


def _short(value: object, limit: int = 60) -> str:
    if value is ABSENT:
        return "(absent)"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _parameters_line(fingerprints: dict[str, tuple[str | None, str | None]]) -> str:
    """How the full-precision parameters compare, by their fingerprints."""
    states = []
    for when, (a, b) in fingerprints.items():
        if a and b:
            states.append(f"{when} {'identical' if a == b else 'differs'}")
        elif a or b:
            states.append(f"{when} not recorded in {'B' if a else 'A'}")
    return f"{'parameters':<16} full precision   " + (", ".join(states) or "not recorded")


def compare(path_a: str | Path | Location, path_b: str | Path | Location) -> tuple[list[str], bool]:
    """Report lines and whether the recordings are identical: every tensor, and the full-precision
    parameters where both fingerprint them. Paths are recordings or run directories, local or `s3://`."""
    paths = [recording_of(at(p)) for p in (path_a, path_b)]
    with RowReader(paths[0]) as a, RowReader(paths[1]) as b:
        names = list(a.tensors) + [n for n in b.tensors if n not in a.tensors]
        diffs = [compare_tensor(a, b, name) for name in names]
        every = int(a.metadata.get("record_every", "1"))
        config_a, config_b = (flatten_config(json.loads(r.metadata.get("config", "{}"))) for r in (a, b))
        meta_a, meta_b = ({k: v for k, v in r.metadata.items() if k != "config"} for r in (a, b))
    fingerprints = {when: (meta_a.pop(key, None), meta_b.pop(key, None))
                    for when, key in PARAMETER_FINGERPRINTS.items()}
    lines = [f"A: {paths[0]}", f"B: {paths[1]}"]
    for d in diffs:
        head = f"{d.name:<16} {d.dtype:<4} {str(list(d.shape)):<16} "
        if d.problem:
            lines.append(head + f"not comparable: {d.problem}")
        elif d.identical:
            lines.append(head + "identical")
        else:
            assert d.first_row is not None  # set with the first differing value
            total = int(np.prod(d.shape)) if d.shape else 1
            where = f"row {d.first_row}" + (f" (step {d.first_row * every})" if d.name in RECORDED_TENSORS else "")
            lines.append(head + f"differs: {d.differing:,} of {total:,} values; max abs {d.max_abs:.3g}, "
                         f"max rel {d.max_rel:.3g}, max {d.max_ulp:,} ulp ({d.dtype}); first at {where}")
    parameters_differ = any(x and y and x != y for x, y in fingerprints.values())
    lines.append(_parameters_line(fingerprints))
    for label, (x, y) in (("config", (config_a, config_b)), ("metadata", (meta_a, meta_b))):
        for key, value_a, value_b in _differing_keys(x, y):
            lines.append(f"{label} differs: {key}: {_short(value_a)} vs {_short(value_b)}")
    same = sum(d.identical for d in diffs)
    lines.append(f"{same} of {len(diffs)} tensors identical"
                 + ("; the full-precision parameters differ" if parameters_differ else ""))
    return lines, same == len(diffs) and not parameters_differ

