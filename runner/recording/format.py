"""The recording's format: the tensors it holds (names, dtypes, shapes), its header and byte layout.

A recording is a safetensors file: 8 bytes of little-endian header length, a JSON header (each
tensor's dtype, shape and byte range, and `__metadata__`: string keys and values), then the raw
tensor bytes. docs/recording.md documents every tensor and metadata key. This module is the only
one outside the writer that knows where those bytes are; it imports neither torch nor numpy, so the
sweep driver and the index can use it.
"""

from __future__ import annotations

import bisect
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

from runner.config import Experiment, build_experiment
from runner.data.corpus import Corpus

FORMAT_VERSION = "1"
HEADER_SLACK = 4096  # bytes reserved for metadata only known at the end (final loss, timings)
ITEM_BYTES = {"BF16": 2, "F32": 4}
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
LENGTH_BYTES = 8  # the header's length, before it
# Metadata keys of the full-precision parameter fingerprints (before the first update, after the last)
PARAMETER_FINGERPRINTS = {"initial": "parameters_initial_sha256", "final": "parameters_final_sha256"}

Layout = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)


def recorded_steps(steps: int, every: int) -> range:
    """Row r of every per-step tensor holds step r * every."""
    return range(0, steps + 1, every)


# An untied model's input embedding E is recorded beside W (the unembedding) under these names.
E_NAMES = {"W": "E", "grads": "E_grads", "momentum": "E_momentum", "variance": "E_variance"}


# What describes an update (none has happened at row 0, which holds zeros for them).
UPDATE_TENSORS = ("grads", "momentum", "variance", "E_grads", "E_momentum", "E_variance", "lr", "grad_norm")


def row_specs(vocab: int, dim: int) -> Layout:
    """Dtype and shape of one row of each per-step tensor (the notebook's six, E's four, lr, grad_norm)."""
    matrices = {"W": ("BF16", (vocab, dim)), "grads": ("BF16", (vocab, dim)), "momentum": ("F32", (vocab, dim)),
                "variance": ("F32", (vocab, dim))}
    return {**matrices, "logits": ("F32", (vocab,)), "loss": ("F32", ()),
            **{E_NAMES[name]: spec for name, spec in matrices.items()}, "lr": ("F32", ()), "grad_norm": ("F32", ())}


def recorded_tensors(exp: Experiment) -> tuple[str, ...]:
    """The per-step tensors of a recording of `exp`, in file order: `record.tensors`; E's for those
    of W's family when the embeddings are untied; `lr` when the learning rate varies (a schedule
    or warm-up); `grad_norm` when gradients are clipped."""
    names = list(exp.record.tensors)
    if not exp.model.tie_embeddings:
        names += [E_NAMES[name] for name in exp.record.tensors if name in E_NAMES]
    if exp.train.lr_varies:
        names.append("lr")
    if exp.train.grad_clip is not None:
        names.append("grad_norm")
    return tuple(names)


# The compact format (docs/recording.md): these are replayed from the gradients, not stored per step.
REPLAYED = ("W", "momentum", "variance", "E", "E_momentum", "E_variance")
KEYFRAME_INTERVAL = 256  # rows between scheduled keyframes: one row of W replays in <= 255 updates
KEYFRAMES = "keyframes"  # the compact format's keyframe tensor: (K, matrices, vocab, dim)
COMPRESSION = "compression"  # metadata of a complete compact recording's compressed tensors (compression.py)


def is_compact(metadata: dict[str, str]) -> bool:
    """Whether a recording is in the compact format, by its own metadata (a run's config says what
    it was asked for; `lilgatsby compact` converts a full one)."""
    return metadata.get("recording_format", "full") == "compact"


def parameter_dtype(exp: Experiment) -> str:
    """The dtype W, its gradient and Adam's moments have in training (bf16-true's are bf16)."""
    return "BF16" if exp.train.precision == "bf16-true" else "F32"


def keyframe_matrices(exp: Experiment) -> tuple[str, ...]:
    """What a keyframe holds, in order along its second axis: W's optimizer state, then E's when untied."""
    return ("W", "momentum", "variance") + (() if exp.model.tie_embeddings else ("E", "E_momentum", "E_variance"))


def scheduled_keyframes(rows: int) -> list[int]:
    """Rows that are keyframes whatever the replay does: 0 and 1 (no update links them: row 1
    is before the first update, its moments zero) and every KEYFRAME_INTERVAL-th row."""
    return sorted({0, 1, *range(KEYFRAME_INTERVAL, rows, KEYFRAME_INTERVAL)} & set(range(rows)))


def compact_layout(exp: Experiment, keyframes: int) -> Layout:
    """Name -> (dtype, shape) of every tensor of a compact recording of `exp` with `keyframes`
    keyframes, in file order: the per-step tensors that cannot be replayed (the gradients in the
    dtype the update used), the final state, the keyframes."""
    full = expected_layout(exp)
    dtype = parameter_dtype(exp)
    layout = {name: (dtype if name in ("grads", "E_grads") else spec[0], spec[1])
              for name, spec in full.items() if name not in REPLAYED}
    layout[KEYFRAMES] = (dtype, (keyframes, len(keyframe_matrices(exp)), exp.model.vocab_size, exp.model.hidden_dim))
    return layout


def stored_layout(exp: Experiment, metadata: dict[str, str]) -> Layout:
    """The layout a recording with this metadata holds, in either format."""
    if not is_compact(metadata):
        return expected_layout(exp)
    return compact_layout(exp, len(json.loads(metadata.get("keyframe_rows", "[]"))))


def final_specs(exp: Experiment) -> Layout:
    """The state after the last update: W's (and E's when untied) with Adam's moments."""
    rows = row_specs(exp.model.vocab_size, exp.model.hidden_dim)
    finals = {"W_final": rows["W"], "momentum_final": rows["momentum"], "variance_final": rows["variance"]}
    if not exp.model.tie_embeddings:
        finals.update(E_final=rows["E"], E_momentum_final=rows["E_momentum"], E_variance_final=rows["E_variance"])
    return finals


def expected_layout(exp: Experiment) -> Layout:
    """Name -> (dtype, full shape) of every tensor a recording of `exp` holds, in file order."""
    rows = len(recorded_steps(exp.train.steps, exp.record.every))
    specs = row_specs(exp.model.vocab_size, exp.model.hidden_dim)
    layout = {name: (specs[name][0], (rows, *specs[name][1])) for name in recorded_tensors(exp)}
    layout.update(final_specs(exp))
    return layout


def tensor_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * ITEM_BYTES[dtype]


def recording_size(exp: Experiment, record_format: str | None = None) -> int:
    """Bytes of tensor data in a recording of `exp` in `record_format` (its own by default; the
    header adds a few KiB). A compact one's with its scheduled keyframes: the replay's own adds one
    per row it could not reproduce (none on the CPU)."""
    if (record_format or exp.record.format) == "compact":
        rows = len(recorded_steps(exp.train.steps, exp.record.every))
        layout = compact_layout(exp, len(scheduled_keyframes(rows)))
    else:
        layout = expected_layout(exp)
    return sum(tensor_bytes(dtype, shape) for dtype, shape in layout.values())


@dataclass(frozen=True)
class Header:
    """A safetensors header as read back: where the data starts and ends, each tensor, the metadata."""

    length: int  # bytes of JSON (reserved space included)
    tensors: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"} (offsets from data_start)
    metadata: dict[str, str]

    @property
    def data_start(self) -> int:
        return LENGTH_BYTES + self.length

    @property
    def end(self) -> int:
        """The file's length as the header describes it."""
        return self.data_start + max((t["data_offsets"][1] for t in self.tensors.values()), default=0)

    def row_ranges(self, names: tuple[str, ...], first: int, stop: int) -> list[tuple[int, int]]:
        """(file offset, length) of rows first..stop-1 of each per-step tensor `names`, in file order."""
        ranges = []
        for name in names:
            begin, end = self.tensors[name]["data_offsets"]
            row_bytes = (end - begin) // self.tensors[name]["shape"][0]
            ranges.append((self.data_start + begin + first * row_bytes, (stop - first) * row_bytes))
        return ranges


    def segment_ranges(self, names: tuple[str, ...], first: int, stop: int) -> list[tuple[int, int]]:
        """(file offset, length) of what rows first..stop-1 add to a recording: the rows of each
        per-step tensor `names` stored here and, in a compact recording, the keyframes of those rows
        (appended in row order, so theirs are one range)."""
        ranges = self.row_ranges(tuple(name for name in names if name in self.tensors), first, stop)
        if KEYFRAMES in self.tensors:
            rows = json.loads(self.metadata.get("keyframe_rows", "[]"))
            a, b = bisect.bisect_left(rows, first), bisect.bisect_left(rows, stop)
            begin, end = self.tensors[KEYFRAMES]["data_offsets"]
            if b > a:
                record = (end - begin) // self.tensors[KEYFRAMES]["shape"][0]
                ranges.append((self.data_start + begin + a * record, (b - a) * record))
        return ranges


def header_length(read: Callable[[int, int], bytes]) -> int:
    """The header's length in bytes, from `read(offset, size)` of the file (struct.error or ValueError
    for a file that is not a safetensors one)."""
    (size,) = struct.unpack("<Q", read(0, LENGTH_BYTES))
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"header of {size:,} bytes")
    return size


def read_header(read: Callable[[int, int], bytes]) -> Header:
    """The header of a safetensors file, given `read(offset, size)` of its bytes. Raises
    struct.error or ValueError for a file that is not one."""
    size = header_length(read)
    tensors = json.loads(read(LENGTH_BYTES, size))
    metadata = tensors.pop("__metadata__", None) or {}
    return Header(size, tensors, metadata)


def header_bytes(read: Callable[[int, int], bytes]) -> bytes:
    """The file's first bytes up to its data (length and header as stored): they hold the run id,
    the start time and the final metrics, so they identify a recording's content cheaply."""
    return read(0, LENGTH_BYTES + header_length(read))


def experiment_of(metadata: dict[str, str]) -> Experiment:
    """The experiment a recording was made by, from its metadata's config."""
    return build_experiment(json.loads(metadata["config"]))


def header_metadata(exp: Experiment, corpus: Corpus, env: dict, started_at: str, n_params: int,
                    device: str) -> dict[str, str]:
    """The metadata known when a run starts (safetensors allows only strings; structured values are JSON)."""
    return {"run_id": exp.run_id, "config": json.dumps(exp.to_dict(), sort_keys=True),
            "seed": str(exp.train.seed), "precision": exp.train.precision, "device": device,
            "steps": str(exp.train.steps), "record_every": str(exp.record.every), "n_params": str(n_params),
            "packages": json.dumps(env["packages"], sort_keys=True), "python": env["python"],
            "git_commit": env["git_commit"], "corpus_sha256": corpus.sha256, "corpus_length": str(len(corpus.text)),
            "corpus_ascii": corpus.mode, "token_counts": json.dumps(corpus.token_counts), "started_at": started_at,
            "cpu": env["cpu"], "cpu_capability": env["cpu_capability"], **({"gpu": env["gpu"]} if env["gpu"] else {})}
