"""The compact format: keyframes chosen while a recording is written, rows replayed while it is read.

A compact recording stores per step only what no replay can recompute (the gradients in the dtype
the update used, logits, loss, lr, grad_norm), the final state, and keyframes of W's (and E's)
optimizer state; every other row of W, momentum and variance is Adam's update replayed from the
nearest keyframe before it (`runner.recording.replay`). The writer replays each update as it records
it and makes a keyframe of every row the replay does not reproduce in every bit, so a recording is
exact whatever the device. docs/recording.md defines the format.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable

import numpy as np
import torch

from runner.config import Experiment
from runner.recording.digests import digest
from runner.recording.format import (
    E_NAMES,
    KEYFRAME_INTERVAL,
    KEYFRAMES,
    REPLAYED,
    expected_layout,
    experiment_of,
    keyframe_matrices,
    parameter_dtype,
    scheduled_keyframes,
    tensor_bytes,
)
from runner.recording.replay import TORCH_DTYPES, AdamReplay

ReadBits = Callable[[str, int, int], np.ndarray]  # (stored tensor, first row, stop row) -> bits as stored


def families(exp: Experiment) -> list[tuple[str, str, str, str]]:
    """(value, gradient, momentum, variance) names of each replayed matrix: W's, and E's when untied."""
    w = ("W", "grads", "momentum", "variance")
    return [w] if exp.model.tie_embeddings else [w, tuple(E_NAMES[n] for n in w)]  # type: ignore[list-item]


def uses_fused_adam(metadata: dict[str, str]) -> bool:
    """Whether the run's Adam was torch's fused one (the replay must be too), from its `implementation`."""
    return json.loads(metadata.get("implementation", "{}")).get("adam") == "fused"


def _replays(exp: Experiment, fused: bool, device: torch.device | None = None) -> list[AdamReplay]:
    shape = (exp.model.vocab_size, exp.model.hidden_dim)
    return [AdamReplay(exp.train, fused, shape, TORCH_DTYPES[parameter_dtype(exp)], device) for _ in families(exp)]


def as_tensor(bits: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored bits (unsigned integers) as a torch tensor of the stored dtype, sharing memory."""
    return torch.from_numpy(bits.view(np.int16 if dtype == "BF16" else np.int32)).view(TORCH_DTYPES[dtype])


def as_bits(t: torch.Tensor) -> np.ndarray:
    """A bf16 or fp32 tensor's bits, as `RowReader.bits` gives stored ones."""
    return t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32).numpy().view(
        np.uint16 if t.dtype == torch.bfloat16 else np.uint32)


class Keyframer:
    """Chooses a compact recording's keyframes while it is written: rows 0 and 1, every
    KEYFRAME_INTERVAL-th, and every row that the replay of the update before it does not reproduce."""

    def __init__(self, exp: Experiment, fused: bool, rows: int, device: torch.device | None = None):
        self.exp, self.families, self.replays = exp, families(exp), _replays(exp, fused, device)
        self.scheduled = set(scheduled_keyframes(rows))
        self.predicted = False  # whether the replays hold the next row's state

    def continue_from(self, reader: CompactRows, row: int) -> None:
        """A resumed recording (`row` >= 2): the replays predict `row` from the row before it, read
        back from the file, as they did when they wrote it."""
        previous = row - 1
        for replay, state, (_, g, _, _) in zip(self.replays, reader.state_at(previous), self.families, strict=True):
            replay.reset(*state, updates=previous - 1)
            replay.update(as_tensor(reader.read_bits(g, previous, row), reader.dtype)[0], step=previous)
        self.predicted = True

    def check(self, row: int, values: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Row `row`'s keyframe (its matrices stacked, in `keyframe_matrices` order) when it is one,
        else None; then the replays step on to the next row with this row's gradient. `values`:
        the row of each tensor of the families, in the parameters' dtype."""
        keyframe = row in self.scheduled or not (
            self.predicted and all(replay.matches(values[w], values[m], values[v])
                                   for replay, (w, _, m, v) in zip(self.replays, self.families, strict=True)))
        if keyframe:
            for replay, (w, _, m, v) in zip(self.replays, self.families, strict=True):
                replay.reset(values[w], values[m], values[v], updates=max(row - 1, 0))
        self.predicted = row >= 1  # row 0 -> row 1 is no update (row 1 is a keyframe anyway)
        if self.predicted:
            for replay, (_, g, _, _) in zip(self.replays, self.families, strict=True):
                replay.update(values[g], step=row)
        return torch.stack([values[name] for name in keyframe_matrices(self.exp)]) if keyframe else None


class Keyframes:
    """A compact recording's keyframes while it is written: which rows (`choose`, in the training
    thread, on the device and with the kernels that train), where each goes (appended after the
    tensors of fixed size, by the writer thread), their digests (a checkpoint keeps them; the
    writer checks them again before the file is published)."""

    def __init__(self, exp: Experiment, layout: dict, rows: int, fused: bool, checked: dict | None,
                 device: torch.device):
        """`checked`: a resumed recording's checkpoint digests, with the keyframes written up to it."""
        dtype, shape = layout[KEYFRAMES]
        self.record_bytes = tensor_bytes(dtype, (1, *shape[1:]))
        self.keyframer = Keyframer(exp, fused, rows, device)
        self.family_names = tuple(name for family in families(exp) for name in family)
        self.scheduled_bytes = len(self.keyframer.scheduled) * self.record_bytes
        kept = (checked or {}).get("keyframes", {"rows": [], "records": []})
        self.rows: list[int] = list(kept["rows"])
        self.digests: list[str] = list(kept["records"])

    def metadata(self) -> dict[str, str]:
        unscheduled = sum(row not in self.keyframer.scheduled for row in self.rows)
        return {"recording_format": "compact", "keyframe_interval": str(KEYFRAME_INTERVAL),
                "keyframe_rows": json.dumps(self.rows, separators=(",", ":")),
                "unscheduled_keyframes": str(unscheduled)}

    def state(self) -> dict:
        """What a checkpoint keeps of them."""
        return {"rows": list(self.rows), "records": list(self.digests)}

    def choose(self, first_row: int, rows: dict[str, torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
        """The keyframes among rows first_row.. of W's families (in the parameters' dtype), as
        (row, keyframe on the CPU)."""
        found = []
        for i in range(len(rows[self.family_names[0]])):
            record = self.keyframer.check(first_row + i, {name: rows[name][i] for name in self.family_names})
            if record is not None:
                found.append((first_row + i, record.cpu()))
        return found

    def append(self, row: int, record: torch.Tensor, write: Callable[[int, memoryview], None]) -> None:
        """Keyframe `row`, `write(offset, bytes)` after the ones before it."""
        assert not self.rows or row > self.rows[-1], "keyframes must come in order"
        data = record.contiguous().view(torch.uint8).numpy().data.cast("B")
        write(len(self.rows) * self.record_bytes, data)
        self.rows.append(row)
        self.digests.append(digest(data))

    def read_back(self, read: Callable[[int, int], bytes]) -> bytes:
        """Every keyframe as the file holds it (`read(first, stop)`), each checked against its digest."""
        data = read(0, len(self.rows))
        for index, expected in enumerate(self.digests):
            if digest(data[index * self.record_bytes:(index + 1) * self.record_bytes]) != expected:
                raise OSError(f"keyframe {index} (row {self.rows[index]}) changed on disk after it was written")
        return data


class CompactRows:
    """A compact recording read as if it were full: any row of any tensor of the full format, with
    the full format's dtypes (W in bf16, gradients rounded to bf16 where the update's were fp32)."""

    def __init__(self, metadata: dict[str, str], read_bits: ReadBits):
        self.read_bits, self.exp = read_bits, experiment_of(metadata)
        self.full = expected_layout(self.exp)
        self.dtype = parameter_dtype(self.exp)
        self.families = families(self.exp)
        self.keyframe_rows: list[int] = json.loads(metadata["keyframe_rows"])
        self.keyframe_index = {row: index for index, row in enumerate(self.keyframe_rows)}
        self.replays = _replays(self.exp, uses_fused_adam(metadata))
        self.at: int | None = None  # the row the replays hold
        self._block: tuple[int, int, dict[str, torch.Tensor]] | None = None  # the last rows replayed

    def bits(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of full-format tensor `name`, as the full format stores them."""
        full_dtype = self.full[name][0]
        if name in REPLAYED:
            rows = self._replayed(start, stop)[name]
        elif full_dtype != self.dtype and name in ("grads", "E_grads"):
            rows = as_tensor(self.read_bits(name, start, stop), self.dtype)
        else:
            return self.read_bits(name, start, stop)
        return as_bits(rows.to(TORCH_DTYPES[full_dtype]))

    def state_at(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(value, momentum, variance) of each family at `row`, in the parameters' dtype."""
        block = self._replayed(row, row + 1)
        return [(block[w][0], block[m][0], block[v][0]) for w, _, m, v in self.families]

    def final_state(self, last: int) -> dict[str, np.ndarray]:
        """The `*_final` tensors as the replay of update `last` (the last step) gives them, as stored."""
        finals = {}
        for replay, state, (w, g, m, v) in zip(self.replays, self.state_at(last), self.families, strict=True):
            replay.reset(*state, updates=last - 1)
            replay.update(as_tensor(self.read_bits(g, last, last + 1), self.dtype)[0], step=last)
            for name, value in zip((w, m, v), replay.state(), strict=True):
                finals[f"{name}_final"] = as_bits(value.to(TORCH_DTYPES[self.full[f"{name}_final"][0]]))
        self.at, self._block = None, None  # the replays moved past what they held
        return finals

    def _replayed(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows start..stop-1 of every replayed tensor, replayed from the nearest keyframe (or from
        where the last call stopped, when that is nearer: analyses read rows in order)."""
        if self._block is not None and self._block[:2] == (start, stop):
            return self._block[2]
        begin = self.keyframe_rows[bisect.bisect_right(self.keyframe_rows, start) - 1]
        if self.at is not None and begin < self.at <= start:
            begin = self.at  # the replays are there already
        else:
            self._reset_to_keyframe(begin)
        grads = {g: as_tensor(self.read_bits(g, begin, stop - 1), self.dtype) for _, g, _, _ in self.families}
        out = {n: torch.empty((stop - start, *self.full[n][1][1:]), dtype=TORCH_DTYPES[self.dtype])
               for w, _, m, v in self.families for n in (w, m, v)}
        for row in range(begin, stop):
            if row > begin:
                if row in self.keyframe_index:
                    self._reset_to_keyframe(row)
                else:
                    for replay, (_, g, _, _) in zip(self.replays, self.families, strict=True):
                        replay.update(grads[g][row - 1 - begin], step=row - 1)
                self.at = row
            if row >= start:
                for replay, (w, _, m, v) in zip(self.replays, self.families, strict=True):
                    for name, value in zip((w, m, v), replay.state(), strict=True):
                        out[name][row - start] = value
        self._block = (start, stop, out)
        return out

    def _reset_to_keyframe(self, row: int) -> None:
        index = self.keyframe_index[row]
        record = as_tensor(self.read_bits("keyframes", index, index + 1), self.dtype)[0]
        order = keyframe_matrices(self.exp)
        for replay, (w, _, m, v) in zip(self.replays, self.families, strict=True):
            value, momentum, variance = (record[order.index(n)] for n in (w, m, v))
            replay.reset(value, momentum, variance, updates=max(row - 1, 0))
        self.at = row
