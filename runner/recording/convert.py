"""A recording rewritten in the other format: `lilgatsby expand` (compact -> full) and `lilgatsby
compact` (full -> compact), through the same writer training uses, fed with rows read back.

Expanding writes exactly what `record.format: full` would have. Compacting replays every update as
the writer does during training (a row the replay does not reproduce becomes a keyframe), and the
result is read back and compared with the source, tensor by tensor and bit for bit, before it is
published; only bf16-true recordings convert, since the full format keeps fp32 and bf16-mixed
runs' W and gradients rounded to bf16, not the fp32 values a replay needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from runner.errors import UserError
from runner.layout import partial
from runner.recording.compact import as_tensor
from runner.recording.format import COMPRESSION, UPDATE_TENSORS, experiment_of, is_compact, recorded_tensors
from runner.recording.rows import RowReader
from runner.recording.writer import RecordingWriter

CHUNK_ROWS = 256
# What describes the bytes of one format, not the run: the writer sets them anew
FORMAT_KEYS = ("digests", "recording_format", "keyframe_interval", "keyframe_rows", "unscheduled_keyframes",
               COMPRESSION)


def convertible(source: RowReader, compact: bool) -> str | None:
    """Why `source` cannot be rewritten in that format (one phrase), or None."""
    if is_compact(source.metadata) == compact:
        return f"already {'compact' if compact else 'in the full format'}"
    exp = experiment_of(source.metadata)
    if compact and exp.train.precision != "bf16-true":
        return (f"a full {exp.train.precision} recording holds W and its gradients rounded to bf16, not the fp32 "
                f"values a replay needs: only bf16-true recordings compact (record.format: compact records "
                f"any precision as it trains)")
    if compact and not exp.record.replayable:
        return "recorded with record.every > 1 or without W, grads, momentum or variance: nothing to replay"
    return None


def rewrite(source: Path, target: Path, compact: bool, progress: bool = True, desc: str = "") -> dict:
    """Write `source` (a complete recording) to `target` in the full or the compact format (through
    `target.partial`: an interrupted rewrite leaves no file with the final name); returns what
    run.json's `recording` says of its format. Refuses, in one line, what cannot be rewritten
    (`convertible`)."""
    with RowReader(source) as reader:
        why = convertible(reader, compact)
        if why:
            raise UserError(f"{source}: {why}")
        exp = experiment_of(reader.metadata)
        metadata = {k: v for k, v in reader.metadata.items() if k not in FORMAT_KEYS and k != "format_version"}
        names = recorded_tensors(exp)
        rows = reader.tensors[names[0]]["shape"][0]
        writer = RecordingWriter(target, exp, metadata=metadata, device=torch.device("cpu"), compact=compact,
                                 chunk_rows=CHUNK_ROWS)
        try:
            with tqdm(total=rows, unit="row", desc=desc or target.name, disable=not progress) as bar:
                for start in range(0, rows, CHUNK_ROWS):
                    stop = min(start + CHUNK_ROWS, rows)
                    block = {n: as_tensor(reader.bits(n, start, stop), reader.tensors[n]["dtype"]) for n in names}
                    for row in range(start, stop):
                        values: dict[str, torch.Tensor | None] = {n: block[n][row - start] for n in names}
                        if row == 0:
                            writer.record_initial({n: v for n, v in values.items() if n not in UPDATE_TENSORS})
                        else:
                            writer.record(row, values)
                    bar.update(stop - start)
            finals = {n: as_tensor(reader.bits(n, 0, reader.tensors[n]["shape"][0]), reader.tensors[n]["dtype"])
                      for n in reader.tensors if n.endswith("_final")}
            writer.close(finals, {})
        except BaseException:
            writer.abort()
            partial(target).unlink(missing_ok=True)
            raise
    difference = first_different_rows(source, target)
    if difference:
        target.unlink()
        raise RuntimeError(f"{source}: the rewritten recording differs from it ({difference}); nothing changed")
    return writer.format_summary()


def first_different_rows(a: Path, b: Path) -> str | None:
    """The first tensor whose rows differ between two recordings read as the full format, or None."""
    with RowReader(a) as x, RowReader(b) as y:
        for name, info in x.tensors.items():
            rows = info["shape"][0] if info["shape"] else 1
            for start in range(0, rows, CHUNK_ROWS):
                stop = min(start + CHUNK_ROWS, rows)
                if not np.array_equal(x.bits(name, start, stop), y.bits(name, start, stop)):
                    return f"{name}: rows {start}..{stop - 1}"
    return None
