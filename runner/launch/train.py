"""One run end to end: check the input, lock the run directory, keep its manifest (run.json) and
log (train.log), train, then analyse the recording (per-step metrics, dead-token summary) and
sample text. `lilgatsby train` calls `run()`, and a sweep calls it inside each Ray task."""

from __future__ import annotations

import contextlib
import logging
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch

from runner.analysis.live import LiveMetrics
from runner.analysis.metrics import dead_token_summary, write_metrics
from runner.config import Experiment
from runner.data.batches import check_enough_text
from runner.data.corpus import Corpus, load_corpus
from runner.interrupt import how_cancelled
from runner.layout import RunFiles
from runner.recording.writer import check_free_space
from runner.runs.rundir import CANCELLED, is_complete, new_manifest, read_manifest, run_lock, write_manifest
from runner.training.host import keep_freed_memory_mapped, resolve_device, thread_count, torch_threads_restored
from runner.training.loop import train
from runner.training.provenance import environment
from runner.training.resume import check_resumable
from runner.training.sampling import sample_text

log = logging.getLogger(__name__)
file_log = logging.getLogger("runner.progress")  # train.log only (`lilgatsby train` prints the samples)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def _log_to(path: Path):
    """Everything the `runner` loggers say at INFO and above also goes to `path`, whatever the console shows."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("runner")
    level = root.level
    root.setLevel(min(level or logging.WARNING, logging.INFO))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def prepare_worker() -> None:
    """A Ray worker's setup hook: importing this module imports the training stack (torch,
    transformers: ~3 s) while the driver is still starting Ray, rather than when the first run
    arrives; and the allocator is set up as a run's would be."""
    keep_freed_memory_mapped()


class Publisher(Protocol):
    """Ships a run trained in a local scratch directory to where it lives (`runner.launch.staging`)."""

    def checkpoint_saved(self, step: int) -> None: ...

    def manifest_written(self, manifest: dict) -> None: ...


def run(exp: Experiment, run_dir: Path, *, overrides: dict | None = None, grid_point: dict | None = None,
        device: str | None = None, threads: int | None = None, progress: bool = True, restart: bool = False,
        force: bool = False, publisher: Publisher | None = None, corpus: Corpus | None = None) -> dict:
    """Train `exp` into `run_dir` (recording, run.json, train.log); returns the manifest. An
    interrupted run continues from its last checkpoint unless `restart`. A run found complete once
    its lock is held (another process may have finished it) is not trained again unless `force`.

    `device` overrides the config's; `threads` is the CPUs the caller offers (a sweep passes what
    Ray assigned; see `host.thread_count`). Bad input (corpus, too little of it, device, disk space) raises before
    anything is written; a failure during training is written to run.json with its traceback and re-raised.
    `publisher` is told of every checkpoint and manifest written (a run whose home is a bucket).
    `corpus`: the book as a sweep's driver sent it (default: read from `corpus.path`)."""
    torch_device = resolve_device(device or exp.train.device)
    corpus = corpus or load_corpus(exp.corpus.path, exp.corpus.ascii)
    check_enough_text(len(corpus.text), exp.train.batch_order, exp.model.context_length, exp.train.batch_size)
    recording = RunFiles(run_dir).recording
    check_free_space(recording, {recording: exp})
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        if not force and is_complete(run_dir, exp):
            return read_manifest(run_dir) or {}
        if restart:
            RunFiles(run_dir).partial_recording.unlink(missing_ok=True)
        else:
            check_resumable(exp, run_dir, corpus, torch_device)
        manifest = new_manifest(exp, overrides, grid_point)
        return _run_locked(exp, run_dir, corpus, torch_device, manifest, thread_count(exp.train.threads, threads),
                           progress, restart, publisher)


def _run_locked(exp: Experiment, run_dir: Path, corpus: Corpus, torch_device: torch.device, manifest: dict[str, Any],
                threads: int, progress: bool, restart: bool, publisher: Publisher | None) -> dict:
    def save(manifest: dict) -> None:
        write_manifest(run_dir, manifest)
        if publisher is not None:
            publisher.manifest_written(manifest)

    manifest = {**manifest, "status": "running", "started_at": _now(), "environment": environment(torch_device)}
    save(manifest)
    live = LiveMetrics(run_dir, exp, corpus.token_counts) if exp.record.live else None
    with _log_to(RunFiles(run_dir).train_log), torch_threads_restored():
        try:
            result, model = train(exp, run_dir, corpus, torch_device, threads, progress, restart,
                                  manifest["environment"], manifest["started_at"],
                                  publisher.checkpoint_saved if publisher else None, live)
            manifest.update(result, corpus=corpus.summary(), **_after_training(exp, run_dir, corpus, model, live))
            manifest["status"] = "complete"
            metrics = manifest["metrics"]
            log.info("run %s complete: final loss %.4f, %.1f steps/s, %s", exp.run_id, metrics["final_loss"],
                     metrics["steps_per_s"], RunFiles(run_dir).recording)
        except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (runner.interrupt)
            manifest["status"], manifest["error"] = CANCELLED, how_cancelled(interrupt)
            log.warning("run %s %s", exp.run_id, manifest["error"])
            raise
        except BaseException as e:
            manifest.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            log.error("run %s failed: %s", exp.run_id, manifest["error"])
            raise
        finally:
            manifest["ended_at"] = _now()
            save(manifest)
    return manifest


def _after_training(exp: Experiment, run_dir: Path, corpus: Corpus, model, live: LiveMetrics | None) -> dict:
    """The end-of-run analysis, before the run is marked complete: the per-step metrics table (the
    live one, or computed now), the dead-token summary of the final matrix, and text samples."""
    said: dict = {}
    if live is not None:
        said["live_metrics"] = live.finish()
    else:
        write_metrics(run_dir)
    W = model.lm_head.weight
    summary = dead_token_summary(W.detach().float().cpu().numpy(), corpus.token_counts)
    samples = sample_text(model.float(), seed=exp.train.seed, device=W.device)
    for prompt, text in samples.items():
        file_log.info("sample %r -> %r", prompt, text)
    return {"samples": samples, "dead_token_summary": summary, **said}
