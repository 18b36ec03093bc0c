"""Digests of every byte of a recording: each per-step tensor in blocks of BLOCK_ROWS rows, each
final tensor whole (BLAKE2b, 16 bytes, hex), so that `verify` checks every byte against what the
writer wrote, and a resume checks the partial file's rows against its checkpoint before writing on.

The writer keeps one running hash per tensor for the block being filled (rows arrive in chunks that
need not align with blocks: a resumed run's first chunk starts where its checkpoint was). The
digests travel as JSON: in the recording's metadata (`digests`) when it is complete, and in each
checkpoint's metadata (`recording_digests`) for the rows written up to it, with the digest of the
block's rows so far (`partial`). docs/recording.md defines them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping

ALGORITHM = "blake2b-128"
BLOCK_ROWS = 64
ReadRows = Callable[[str, int, int], bytes]  # (tensor, first row, stop row) -> the rows' bytes as stored


def digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def reserved_bytes(names: tuple[str, ...], rows: int, finals: int) -> int:
    """Header bytes the complete `digests` JSON may take (reserved when the file is created)."""
    per_digest = 32 + 8  # hex, its quotes (escaped: the JSON is a metadata string) and a comma
    blocks = -(-rows // BLOCK_ROWS)
    return 256 + len(names) * (blocks * per_digest + 64) + finals * (per_digest + 64)


class RowDigests:
    """Block digests of the per-step tensors `names`, as their rows are written in order."""

    def __init__(self, names: tuple[str, ...], first_row: int = 0, read_rows: ReadRows | None = None,
                 checked: dict | None = None):
        """`first_row` > 0 continues a file whose rows before it are written. `checked`: its
        checkpoint's digests, which a resume has checked against those rows (`first_difference`):
        their complete blocks are taken as they are, and only the rows of the block being filled
        are read back with `read_rows`; without them, every row before `first_row` is."""
        assert checked is None or checked["rows"] == first_row, "the digests are of other rows"
        self.names = names
        kept = first_row // BLOCK_ROWS if checked else 0
        self.blocks: dict[str, list[str]] = {name: list(checked["blocks"][name][:kept]) if checked else []
                                             for name in names}
        self.hashers = {name: hashlib.blake2b(digest_size=16) for name in names}
        self.rows = kept * BLOCK_ROWS
        for start in range(self.rows, first_row, BLOCK_ROWS):
            assert read_rows is not None
            stop = min(start + BLOCK_ROWS, first_row)
            self.update(start, {name: memoryview(read_rows(name, start, stop)) for name in names}, stop - start)

    def update(self, first_row: int, rows: dict[str, memoryview], n_rows: int) -> None:
        """Rows first_row..first_row + n_rows - 1 of every tensor, as stored (contiguous bytes)."""
        assert first_row == self.rows, "rows must be digested in order"
        for name in self.names:
            data, row_bytes = rows[name], len(rows[name]) // n_rows
            row = first_row
            while row < first_row + n_rows:
                take = min(BLOCK_ROWS - row % BLOCK_ROWS, first_row + n_rows - row)
                offset = (row - first_row) * row_bytes
                self.hashers[name].update(data[offset:offset + take * row_bytes])
                row += take
                if row % BLOCK_ROWS == 0:
                    self.blocks[name].append(self.hashers[name].hexdigest())
                    self.hashers[name] = hashlib.blake2b(digest_size=16)
        self.rows += n_rows

    def state(self) -> dict:
        """What a checkpoint keeps: the complete blocks, and the digest of the rows so far of the
        block being filled."""
        partial = {name: h.hexdigest() for name, h in self.hashers.items()} if self.rows % BLOCK_ROWS else {}
        return {"algorithm": ALGORITHM, "block_rows": BLOCK_ROWS, "rows": self.rows, "blocks": self.blocks,
                "partial": partial}

    def final(self, finals: Mapping[str, bytes | memoryview]) -> str:
        """The complete recording's `digests` metadata: every block (the last may be short) and
        each final tensor whole."""
        blocks = {name: [*b, self.hashers[name].hexdigest()] if self.rows % BLOCK_ROWS else b
                  for name, b in self.blocks.items()}
        return json.dumps({"algorithm": ALGORITHM, "block_rows": BLOCK_ROWS, "rows": self.rows, "blocks": blocks,
                           "finals": {name: digest(data) for name, data in finals.items()}},
                          separators=(",", ":"), sort_keys=True)


def first_difference(digests: dict, read_rows: ReadRows, read_whole: Callable[[str], bytes],
                     progress: Callable[[int], None] | None = None) -> str | None:
    """The first tensor and rows whose bytes differ from `digests` (a recording's or, with
    `partial`, a checkpoint's: then only the rows it covers), as one phrase; None when all match.
    Every tensor the digests name must be there."""
    if digests.get("algorithm") != ALGORITHM or digests.get("block_rows") != BLOCK_ROWS:
        return f"digests of an unknown kind ({digests.get('algorithm')}, {digests.get('block_rows')} rows a block)"
    rows = digests["rows"]
    for name, blocks in digests["blocks"].items():
        for index, expected in enumerate(blocks):
            first, stop = index * BLOCK_ROWS, min((index + 1) * BLOCK_ROWS, rows)
            if digest(read_rows(name, first, stop)) != expected:
                return f"{name}: rows {first}..{stop - 1} differ from the digest written with them"
            if progress is not None:
                progress(stop - first)
        done = len(blocks) * BLOCK_ROWS
        if name in digests.get("partial", {}) and done < rows:
            if digest(read_rows(name, done, rows)) != digests["partial"][name]:
                return f"{name}: rows {done}..{rows - 1} differ from the digest written with them"
    kept = digests.get("keyframes", {"rows": [], "records": []})  # a partial compact recording's
    for index, (row, expected) in enumerate(zip(kept["rows"], kept["records"], strict=True)):
        if digest(read_rows("keyframes", index, index + 1)) != expected:
            return f"keyframes: keyframe {index} (row {row}) differs from the digest written with it"
    for name, expected in digests.get("finals", {}).items():
        if digest(read_whole(name)) != expected:
            return f"{name}: differs from the digest written with it"
    return None
