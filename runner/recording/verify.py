"""Reading recordings back: metadata, tensors, and `verify` (header, layout, values, Adam's relation).

Reads go through the safetensors library: memory-mapped, nothing executed. (`rows` streams rows
without torch, for analyses whose memory must stay bounded.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from runner.config import Experiment
from runner.errors import UserError
from runner.layout import recording_of
from runner.recording.compression import CorruptBlock
from runner.recording.digests import first_difference
from runner.recording.format import (
    FORMAT_VERSION,
    experiment_of,
    recorded_steps,
    recorded_tensors,
    stored_layout,
)
from runner.recording.rows import RowReader
from runner.storage.location import Local, Location


def layout_problems(path: Path, exp: Experiment) -> list[str]:
    """Problems with a recording's header: missing file, unreadable header, wrong names, dtypes or
    shapes for `exp` in the recording's own format (a compact one's keyframes as its metadata lists
    them). Reads the header alone: a partial file (longer than its header says) passes."""
    if not path.exists():
        return [f"{path}: missing"]
    try:
        with RowReader(path) as f:
            return _stored_layout_problems(path, f, exp)
    except UserError as e:
        return [str(e)]


def _stored_layout_problems(path: Path, f: RowReader, exp: Experiment) -> list[str]:
    found = {name: (info["dtype"], tuple(info["shape"])) for name, info in f.stored.items()}
    expected = stored_layout(exp, f.metadata)
    problems = [f"{path}: {name}: missing" for name in expected if name not in found]
    problems += [f"{path}: {name}: unexpected tensor" for name in found if name not in expected]
    for name, (dtype, shape) in expected.items():
        if name in found and found[name] != (dtype, shape):
            problems.append(f"{path}: {name}: {found[name][0]}{list(found[name][1])}, expected {dtype}{list(shape)}")
    return problems


REQUIRED_METADATA = ("format_version", "run_id", "config", "seed", "precision", "device", "steps", "record_every",
                     "n_params", "git_commit", "corpus_sha256", "token_counts", "final_loss", "steps_per_s")
ADAM_SAMPLES = 8  # steps at which the quick check (a run's completeness) checks Adam's relation between rows
ADAM_BLOCK_ROWS = 256  # rows of each moment read at once when `verify` checks every step


def adam_violations(m_next: torch.Tensor, v_next: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                    g: torch.Tensor, betas: tuple[float, float], precision: str) -> int:
    """Entries breaking m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2 beyond rounding: g is stored in
    bf16 (unit roundoff 2^-8), arithmetic is fp32, and bf16-true's moments are bf16 tensors updated
    in place (one rounding for exp_avg, two for exp_avg_sq; we allow two for both)."""
    return int(_adam_breaks(m_next, v_next, m, v, g, betas, precision).sum())


def _adam_breaks(m_next: torch.Tensor, v_next: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                 g: torch.Tensor, betas: tuple[float, float], precision: str) -> torch.Tensor:
    """Per entry, whether it breaks Adam's relation (`adam_violations`); any shape, elementwise."""
    b1, b2 = betas
    bf16_u, fp32_u = 2.0 ** -8, 2.0 ** -24
    slack = 2 * bf16_u if precision == "bf16-true" else 0.0
    g = g.float()
    m_pred, v_pred = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    m_tol = (1 - b1) * g.abs() * bf16_u + (slack + 4 * fp32_u) * m_pred.abs()
    v_tol = (1 - b2) * g * g * 3 * bf16_u + (slack + 4 * fp32_u) * v_pred.abs()
    return ((m_next - m_pred).abs() > m_tol) | ((v_next - v_pred).abs() > v_tol)


def verify(path: Path, full: bool = True) -> list[str]:
    """Problems with a recording (or a run directory's), one line each; [] when it is valid.

    Always: the header parses, the metadata is there, names/shapes/dtypes match the recorded
    config in the recording's format. `full` (what `lilgatsby verify` does: reads the whole file)
    also checks that safetensors opens it, every byte against the digests written with it (a
    recording made before them has none: see `has_digests`), every value for NaN/Inf, Adam's
    relation between rows at every step and, in a compact recording, that the replay of the last
    update gives the final state stored; the quick check Adam's relation at ADAM_SAMPLES steps."""
    path = recording_of(Local(Path(path))).path
    if not path.exists():
        return [f"{path}: missing"]
    try:
        reader = RowReader(path)
    except UserError as e:
        return [f"{path}: not a readable safetensors file: {str(e).removeprefix(f'{path}: ')}"]
    with reader:
        meta = reader.metadata
        problems = [f"{path}: metadata: {key} missing" for key in REQUIRED_METADATA if key not in meta]
        if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            problems.append(f"{path}: format_version {meta['format_version']}, expected {FORMAT_VERSION}")
        try:
            exp = experiment_of(meta)
        except (KeyError, ValueError) as e:
            return problems + [f"{path}: metadata: config unusable ({e})"]
        wrong_layout = _stored_layout_problems(path, reader, exp)
        if wrong_layout:
            return problems + wrong_layout
        if full:
            opens = _opens_problems(path)
            if opens:
                return problems + opens
        try:
            return problems + _content_problems(path, reader, exp, full)
        except CorruptBlock as e:  # a compressed block that no longer decompresses: where, once
            return problems + [str(e)]


def _content_problems(path: Path, reader: RowReader, exp: Experiment, full: bool) -> list[str]:
    """The values (finite, Adam's relation, the schedule, a compact recording's last replay) and,
    with `full`, every byte against its digest."""
    problems = _finite_problems(path, reader) if full else []
    recorded = set(recorded_tensors(exp))
    for moments in (("momentum", "variance", "grads"), ("E_momentum", "E_variance", "E_grads")):
        if exp.record.every == 1 and set(moments) <= recorded:
            problems += _adam_problems(path, exp, reader, moments, every_step=full)
    if "lr" in recorded:
        lr = reader.rows("lr", 0, reader.tensors["lr"]["shape"][0])
        problems += _lr_problems(path, exp, torch.from_numpy(lr))
    if full and reader.compact is not None:
        problems += _final_replay_problems(path, reader)
    if full and "digests" in reader.metadata:
        problems += _digest_problems(path, reader, json.loads(reader.metadata["digests"]))
    return problems


def _opens_problems(path: Path) -> list[str]:
    """safetensors' own reader opens the file (its checks of the header against the length)."""
    try:
        with safe_open(str(path), framework="pt"):
            return []
    except Exception as e:  # safetensors raises its own error types for a corrupt or truncated file
        return [f"{path}: not a readable safetensors file: {e}"]


def _finite_problems(path: Path, reader: RowReader) -> list[str]:
    """Every value of every tensor (a compact recording's replayed ones included) finite."""
    problems = []
    for name, info in reader.tensors.items():
        rows = info["shape"][0] if info["shape"] else 1
        for start in range(0, rows, 1024):  # bounded memory on a 1 GB file
            stop = min(start + 1024, rows)
            if not np.isfinite(reader.rows(name, start, stop) if info["shape"] else reader.rows(name, 0, 1)).all():
                problems.append(f"{path}: {name}: NaN or Inf in rows {start}..{stop - 1}")
                break
    return problems


def _final_replay_problems(path: Path, reader: RowReader) -> list[str]:
    """A compact recording's last update, replayed, gives the final state it stores."""
    assert reader.compact is not None
    last = reader.tensors["loss" if "loss" in reader.tensors else "grads"]["shape"][0] - 1
    replayed = reader.compact.final_state(last)
    return [f"{path}: {name}: the replay of the last update does not give it" for name, bits in replayed.items()
            if not np.array_equal(bits, reader.stored_bits(name, 0, reader.tensors[name]["shape"][0]))]


def has_digests(recording: Location) -> bool:
    """Whether the recording holds the digests of its bytes (those written before they were kept
    do not: `verify` checks their values, not every byte)."""
    with RowReader(recording_of(recording)) as reader:
        return "digests" in reader.metadata


def _digest_problems(path: Path, reader: RowReader, digests: dict) -> list[str]:
    changed = first_difference(digests, lambda name, first, stop: reader.stored_bits(name, first, stop).tobytes(),
                               lambda name: reader.stored_bits(name, 0, reader.stored[name]["shape"][0]).tobytes())
    return [f"{path}: {changed}"] if changed else []


def _adam_problems(path: Path, exp: Experiment, reader: RowReader, names: tuple[str, str, str],
                   every_step: bool) -> list[str]:
    """Adam's moment relation between rows (with the gradient as recorded: clipped, when clipping
    is on), at every step, a block of rows at a time, or at ADAM_SAMPLES steps."""
    steps, problems = exp.train.steps, []
    if every_step:
        starts = [(t, min(t + ADAM_BLOCK_ROWS, steps)) for t in range(1, steps, ADAM_BLOCK_ROWS)]
    else:
        starts = [(t, t + 1) for t in sorted({1 + (steps - 2) * i // (ADAM_SAMPLES - 1) for i in range(ADAM_SAMPLES)}
                                             if steps > 1 else set())]
    for first, stop in starts:  # rows first..stop-1 against rows first+1..stop
        m, v = (torch.from_numpy(reader.rows(name, first, stop + 1)) for name in names[:2])
        g = torch.from_numpy(reader.rows(names[2], first, stop))
        breaks = _adam_breaks(m[1:], v[1:], m[:-1], v[:-1], g, exp.train.betas, exp.train.precision).flatten(1).sum(1)
        bad = breaks.nonzero().flatten().tolist()
        problems += [f"{path}: rows {first + i}->{first + i + 1}: {int(breaks[i])} entries break Adam's update rule"
                     for i in bad[:1 if every_step else None]]
        if every_step and bad:
            break  # the first, when every step is checked
    return problems


def _lr_problems(path: Path, exp: Experiment, lr: torch.Tensor) -> list[str]:
    """Each row's learning rate is the schedule's for its step, in fp32 (0 at row 0: no update)."""
    steps = recorded_steps(exp.train.steps, exp.record.every)
    expected = torch.tensor([exp.train.learning_rate(s) for s in steps], dtype=torch.float32)
    wrong = (lr != expected).nonzero().flatten().tolist()
    return [f"{path}: lr: rows {wrong[:5]} differ from train.lr_schedule's"] if wrong else []


def read_metadata(path: Path) -> dict[str, str]:
    """A recording's metadata (complete or partial: the header alone is read)."""
    with RowReader(path) as f:
        return f.metadata


def verify_at(recording: Location) -> list[str]:
    """`verify` of a recording (or a run directory's) wherever it is (one in a bucket is fetched to
    a temporary file, as a full check reads every byte); problems name the recording where it is."""
    recording = recording_of(recording)
    with recording.local_copy() as local:
        return [problem.replace(str(local), str(recording)) for problem in verify(local)]

