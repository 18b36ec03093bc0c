"""What a resumed run checks and continues: the run, book and kernels it started with, the
recording's bytes as its checkpoint's digests say they were written, and its thread count. A
resume that would mix is refused before anything is written (`check_resumable`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from runner.config import Experiment
from runner.data.corpus import Corpus
from runner.errors import ConfigError
from runner.layout import RunFiles
from runner.model.kernels import Kernels, choose
from runner.recording.digests import first_difference
from runner.recording.format import is_compact
from runner.recording.rows import RowReader
from runner.recording.verify import layout_problems, read_metadata
from runner.recording.writer import RecordingWriter, RowSink
from runner.text import plural
from runner.training import checkpoint
from runner.training.host import keep_freed_memory_mapped

log = logging.getLogger(__name__)


def implementation(kernels: Kernels) -> dict[str, str]:
    """The implementation choices a run trains with (its kernels and the host allocator): recorded,
    since they change rounding."""
    return {**kernels.as_dict(), "host_allocator": keep_freed_memory_mapped()}


def check_resumable(exp: Experiment, run_dir: Path, corpus: Corpus, device: torch.device) -> None:
    """A run resumes only what it started: the same run (config), book and implementation as its
    partial recording says it was trained with, and the recording's rows as its checkpoint's
    digests say they were written; else one line (nothing changed), for the user to choose
    `--restart`. A run with no checkpoint or no usable partial recording starts over anyway."""
    files = RunFiles(run_dir)
    if not files.checkpoint.exists() or layout_problems(files.partial_recording, exp):
        return
    started = read_metadata(files.partial_recording)
    now = {"run_id": exp.run_id, "corpus_sha256": corpus.sha256,
           "implementation": json.dumps(implementation(choose(exp.train.precision, device, exp.train.kernels)),
                                        sort_keys=True)}
    what = {"run_id": "another run", "corpus_sha256": "another book (corpus sha256)",
            "implementation": "other kernels"}
    for key, value in now.items():
        if started.get(key) != value:
            raise ConfigError(f"{run_dir}: its checkpoint was trained with {what[key]} ({started.get(key)}; now "
                              f"{value}): resuming would mix them; --restart trains it again from step 0 "
                              f"(nothing changed)")
    digests = checkpoint.recording_digests(run_dir)
    if digests is not None:
        with RowReader(files.partial_recording) as reader:
            changed = first_difference(digests,
                                       lambda name, first, stop: reader.stored_bits(name, first, stop).tobytes(),
                                       read_whole=lambda name: b"")
        if changed:
            raise ConfigError(f"{files.partial_recording}: {changed} (the checkpoint's): the partial recording was "
                              f"changed since; --restart trains the run again from step 0 (nothing changed)")


def open_recording(exp: Experiment, run_dir: Path, model, optimizer, restart: bool, header: dict,
                    device: torch.device, sink: RowSink | None) -> tuple[RecordingWriter, checkpoint.Checkpoint | None]:
    """Continue from the run's checkpoint when it and the partial recording are usable, else start
    over (`check_resumable` has refused a resume that would mix)."""
    files = RunFiles(run_dir)
    partial = files.partial_recording
    resumable = not restart and files.checkpoint.exists()
    if resumable and layout_problems(partial, exp):
        log.warning("run %s: a checkpoint but no usable partial recording; starting over", exp.run_id)
        resumable = False
    ckpt = checkpoint.load(run_dir, exp.run_id, model, optimizer) if resumable else None
    if ckpt is None:
        checkpoint.remove(run_dir)
    first_row = ckpt.step // exp.record.every + 1 if ckpt else 0
    compact = is_compact(read_metadata(partial)) if ckpt else exp.record.format == "compact"
    writer = RecordingWriter(files.recording, exp, metadata=header, device=device, first_row=first_row, sink=sink,
                             checked_digests=ckpt.recording_digests if ckpt else None, compact=compact)
    return writer, ckpt


def continue_with_threads_of(ckpt: checkpoint.Checkpoint, run_id: str) -> None:
    """A resumed run trains on with the thread count it started with, whatever it is offered now:
    torch splits reductions by thread, so mixing counts would mix bits."""
    if ckpt.threads is None:
        log.warning("run %s: its checkpoint does not record a thread count; continuing with %s, "
                    "so the result may differ in the last bits from an uninterrupted run", run_id,
                    plural(torch.get_num_threads(), "thread"))
    elif ckpt.threads != torch.get_num_threads():
        log.warning("run %s: resuming with the %s it started with (offered %d)", run_id,
                    plural(ckpt.threads, "thread"), torch.get_num_threads())
        torch.set_num_threads(ckpt.threads)
        if torch.get_num_threads() != ckpt.threads:
            raise RuntimeError(f"run {run_id}: cannot resume with the {plural(ckpt.threads, 'thread')} it started "
                               f"with (torch runs {torch.get_num_threads()}); --restart trains it again from step 0")
