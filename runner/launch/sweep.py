"""Sweeps on Ray: one task per run, placed on a GPU, an Apple MPS worker or CPUs.

With `ray_session` and `nodes`, the only modules that import Ray. Each task trains one run
directory under the runs root: a local directory (`runner.launch.train.run`; local disk for the
embedded instance, a volume every node mounts in a cluster) or `s3://bucket/prefix`
(`runner.launch.run_at`: each worker stages the run on its own disk and publishes it to the
bucket; no shared filesystem). The book travels with the tasks: the driver reads each distinct
book once and puts its bytes in Ray's object store; each task checks their SHA-256 before it
trains. On a cluster every node is checked first (`runner.launch.nodes`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import ray
from tqdm import tqdm

from runner.config import Experiment, Run, build_experiment, load_runs
from runner.data.corpus import Book, corpus_of, read_book, resolve_path
from runner.errors import ConfigError, RunLocked, UserError
from runner.interrupt import how_cancelled, sigterm_as_interrupt
from runner.launch.nodes import check_nodes, check_this_node, identity
from runner.launch.ray_session import start_or_join, wait_for_nodes
from runner.layout import INDEX_JSONL, RunFiles
from runner.recording.format import recording_size
from runner.recording.writer import check_free_space, compact_hint
from runner.runs.estimate import estimate_seconds, measured_speeds
from runner.runs.index import rebuild_index
from runner.runs.rundir import (
    CANCELLED,
    is_complete,
    new_manifest,
    read_manifest,
    read_progress,
    tidy_complete,
    write_manifest,
)
from runner.storage.location import Location, at
from runner.text import format_duration, plural

log = logging.getLogger(__name__)
STATUS_EVERY_S = 30.0


def task_options(exp: Experiment, cluster: dict[str, float]) -> dict:
    """Ray resources for one run: GPUs when the cluster has them (and the run may use them), else
    the custom resource `mps` when it has Apple MPS workers, else CPUs. `train.device` pins it."""
    res, pinned = exp.resources, exp.train.device
    if pinned == "auto":
        if cluster.get("GPU", 0) > 0 and res.gpus_per_run > 0:
            pinned = "cuda"
        elif cluster.get("mps", 0) > 0:
            pinned = "mps"
        else:
            pinned = "cpu"
    options: dict = {"num_cpus": res.cpus_per_run}
    if pinned == "cuda":
        options["num_gpus"] = res.gpus_per_run or 1
    elif pinned == "mps":
        options["resources"] = {"mps": min(res.gpus_per_run or 1, 1)}
    needed = {"cuda": "GPU", "mps": "mps"}.get(pinned)
    if needed and cluster.get(needed, 0) <= 0:
        raise ConfigError(f"train.device: {exp.train.device!r} needs the Ray resource {needed!r}, "
                          f"which this cluster does not have")
    return options


def assigned_device() -> tuple[str, int]:
    """Inside a task: the device Ray gave it and the CPUs it may use (torch's thread count)."""
    assigned = ray.get_runtime_context().get_assigned_resources()
    if ray.get_gpu_ids():
        device = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES, so cuda:0 is the assigned GPU
    elif assigned.get("mps"):
        device = "mps"
    else:
        device = "cpu"
    return device, max(1, int(assigned.get("CPU", 1)))


@ray.remote
def _train_task(driver: dict[str, str], book: bytes, book_source: str, book_sha256: str, config: dict,
                overrides: dict, grid_point: dict, run_dir: str, restart: bool, force: bool) -> dict:
    """One run on the node Ray chose; `book` is the book's bytes from the object store (read by the
    driver at `book_source`), `driver` the driver's identity (plain values, so a node of another
    version fails the check, not a pickle)."""
    check_this_node(driver)
    from runner.launch.run_at import train_at  # the model stack is imported by workers only (ray_session)

    exp = build_experiment(config)
    corpus = corpus_of(Book(book, book_source, book_sha256), exp.corpus.ascii)
    device, threads = assigned_device()
    home = at(run_dir)
    try:
        home.make_dir()
    except ConfigError as e:
        raise RuntimeError(f"worker {socket.gethostname()}: {e}: the runs root must be storage every worker "
                           f"can reach") from None
    with sigterm_as_interrupt():  # a worker's SIGTERM cancels its run, resumable
        manifest = train_at(exp, home, overrides=overrides, grid_point=grid_point, device=device, threads=threads,
                            progress=False, restart=restart, force=force, corpus=corpus)
    producer = manifest.get("environment", {})  # another sweep on the same runs root may have trained it meanwhile
    trained_here = (producer.get("host"), producer.get("pid")) == (socket.gethostname(), os.getpid())
    return {"run_id": manifest["run_id"], "device": manifest["device"], "trained_here": trained_here,
            **manifest["metrics"]}


def plan(path: Path, overrides: list[str], runs_root: Location, force: bool) -> tuple[list[Run], list[Run], Location]:
    """All runs of the experiment, those still to train, and the experiment's directory."""
    runs = load_runs(path, overrides)
    exp_dir = runs_root.resolve() / runs[0].experiment.name
    todo = [r for r in runs if force or not is_complete(exp_dir / r.run_id, r.experiment)]
    return runs, todo, exp_dir


def describe(runs: list[Run], todo: list[Run], runs_root: Location) -> str:
    """The dry-run listing: one line per run, the count, the disk the recordings need and the time
    their training takes on this machine, where runs of the same shape were measured here."""
    pending = {r.run_id for r in todo}
    measured = measured_speeds(runs_root)
    estimates = {r.run_id: estimate_seconds(r.experiment, measured) for r in todo}
    lines = []
    for r in runs:
        estimate = estimates.get(r.run_id)
        time_text = f"  ~{format_duration(estimate[0])}" if estimate else ""
        lines.append(f"{r.run_id}  {'todo' if r.run_id in pending else 'done'}  {r.label}{time_text}")
    need = sum(recording_size(r.experiment) for r in todo)
    formats = sorted({r.experiment.record.format for r in todo}) or ["full"]
    compressed_later = ", before compression" if "compact" in formats else ""  # done as each completes
    lines.append(f"{plural(len(runs), 'run')}, {len(todo)} to train, {need / 2**30:.2f} GiB of recordings to write "
                 f"(record.format: {', '.join(formats)}{compressed_later}{compact_hint([r.experiment for r in todo])})")
    known = [e for e in estimates.values() if e]
    if known:
        lines.append(f"time: ~{format_duration(sum(s for s, _ in known))} of training one run at a time on this "
                     f"machine (speed of {plural(max(n for _, n in known), 'run')} of the same shape measured here)")
    if len(known) < len(todo):
        lines.append(f"time: unknown for {plural(len(todo) - len(known), 'run')}: no run of their shape (model, "
                     f"batch, precision, kernels, device, threads) has been trained on this machine yet")
    return "\n".join(lines)


def read_books(todo: list[Run]) -> tuple[dict[str, str], dict[str, Book]]:
    """Read each distinct book once and check that it cleans, before Ray starts (downloading it
    once, not in every task): where the driver read each run's book (by run id), and the books by
    that path. The runs' configs keep their corpus.path as written (unset, as `train` keeps it,
    when the book comes from LILGATSBY_CORPUS); run.json's `corpus.source` says where it was read."""
    books: dict[str, Book] = {}
    cleaned: set[tuple[str, str]] = set()
    where: dict[str, str] = {}
    for r in todo:
        corpus = r.experiment.corpus
        path = where[r.run_id] = str(resolve_path(corpus.path).resolve())
        if path not in books:
            books[path] = read_book(Path(path))
        if (path, corpus.ascii) not in cleaned:  # a book that does not clean is refused here, not in a task
            corpus_of(books[path], corpus.ascii)
            cleaned.add((path, corpus.ascii))
    return where, books


def _status_line(running: list[Run], exp_dir: Location) -> str:
    parts = []
    for r in running:
        current = read_progress(exp_dir / r.run_id)
        if current:
            parts.append(f"{r.label} {current['step']}/{current['steps']} loss {current['loss']:.4f}")
    return "running: " + ("; ".join(parts) or "starting")


def _mark(run_dir: Location, r: Run, status: str, error: str) -> None:
    """Record in run.json what the driver saw (a task that died before or without writing it);
    an unreadable run.json is left as it is, and so is one the server cannot be asked about."""
    try:
        manifest = read_manifest(run_dir) or new_manifest(r.experiment, r.overrides, r.point)
        if manifest.get("status") in ("complete", "failed"):
            return
        run_dir.make_dir()
        write_manifest(run_dir, {**manifest, "status": status, "error": error})
    except (UserError, RuntimeError) as e:  # UnreadableManifest; StorageError
        log.warning("%s: run.json not updated: %s", run_dir, e)


def sweep(path: Path, overrides: list[str], runs_root: Location, *, address: str | None = None, force: bool = False,
          dry_run: bool = False, max_retries: int = 2, progress: bool = True, restart: bool = False,
          expect_nodes: int = 0) -> int:
    """Run every point of the experiment's grid that is not complete; returns the exit code
    (0: every run complete, 1: some failed or are being trained by another process)."""
    runs_root.probe()  # a bucket's reach, credentials, permission: before anything is read there
    runs, todo, exp_dir = plan(path, overrides, runs_root, force)
    if dry_run:
        print(describe(runs, todo, runs_root))
        return 0
    pending_ids = {r.run_id for r in todo}
    for r in runs:
        if r.run_id not in pending_ids:
            tidy_complete(exp_dir / r.run_id)
    if not todo:
        rebuild_index(exp_dir)
        print(f"{exp_dir}: {'the run is' if len(runs) == 1 else f'all {len(runs)} runs'} complete; nothing to train "
              f"(--force trains {'it' if len(runs) == 1 else 'them'} again)")
        return 0
    if exp_dir.local is not None:  # all of them, before any trains (each run checks its own again)
        check_free_space(exp_dir.local, {RunFiles(exp_dir.local / r.run_id).recording: r.experiment for r in todo})
    book_of, books = read_books(todo)
    joined = start_or_join(address)
    try:
        with sigterm_as_interrupt():  # again: Ray's core took SIGTERM over when it started
            if joined:
                wait_for_nodes(expect_nodes)
                check_nodes(exp_dir.parent)
            exp_dir.make_dir()
            cluster, driver = ray.cluster_resources(), identity()
            sent = {where: ray.put(book.data) for where, book in books.items()}  # once each, not once per task
            pending = {}
            for r in todo:
                options = task_options(r.experiment, cluster)
                book = book_of[r.run_id]  # where the driver read it
                ref = _train_task.options(**options, max_retries=max_retries, retry_exceptions=False,
                                          name=f"{r.experiment.name}/{r.run_id}").remote(
                    driver, sent[book], book, books[book].sha256, r.experiment.to_dict(), r.overrides, r.point,
                    str(exp_dir / r.run_id), restart, force)
                pending[ref] = r
            return _collect(pending, exp_dir, len(runs) - len(todo), progress)
    finally:
        ray.shutdown()


def _collect(pending: dict, exp_dir: Location, already_done: int, progress: bool) -> int:
    failed: list[str] = []
    busy: list[str] = []  # being trained by another process (another sweep on the same runs root)
    bar = tqdm(total=len(pending), unit="run", desc=exp_dir.name, disable=not progress, dynamic_ncols=True)
    last_status = time.monotonic()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            if time.monotonic() - last_status >= STATUS_EVERY_S:
                tqdm.write(_status_line(list(pending.values()), exp_dir))
                last_status = time.monotonic()
            if not ready:
                continue
            r = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
                how = f"complete on {result['device']}" if result["trained_here"] else "completed by another process"
                tqdm.write(f"{r.label} ({r.run_id}) {how}: "
                           f"final loss {result['final_loss']:.4f}, {result['steps_per_s']:.1f} steps/s")
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                if isinstance(cause, RunLocked):  # another sweep is training it: leave its run.json alone
                    busy.append(r.run_id)
                    tqdm.write(f"{r.label} ({r.run_id}) skipped: {cause}")
                elif isinstance(e, ray.exceptions.TaskCancelledError):  # its worker got SIGTERM (the run says so)
                    failed.append(r.run_id)
                    _mark(exp_dir / r.run_id, r, CANCELLED, "cancelled by SIGTERM on its worker; resumable")
                    tqdm.write(f"{r.label} ({r.run_id}) cancelled on its worker (SIGTERM); the same command resumes it")
                else:
                    failed.append(r.run_id)
                    _mark(exp_dir / r.run_id, r, "failed", f"{type(cause).__name__}: {cause}".splitlines()[0])
                    tqdm.write(f"{r.label} ({r.run_id}) FAILED: {str(cause).splitlines()[0]} "
                               f"(see {RunFiles(exp_dir / r.run_id).manifest})")
            rebuild_index(exp_dir)
            bar.set_postfix(done=bar.n + 1 - len(failed) - len(busy), failed=len(failed), refresh=False)
            bar.update()
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (runner.interrupt)
        for r in pending.values():  # first: Ray itself may be stopping too (scancel signals every process)
            _mark(exp_dir / r.run_id, r, CANCELLED, how_cancelled(interrupt))
        rebuild_index(exp_dir)
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    total = bar.total + already_done
    print(f"{exp_dir}: {total - len(failed) - len(busy)}/{plural(total, 'run')} complete"
          + (f", {len(failed)} failed: {' '.join(failed)}" if failed else "")
          + (f", {len(busy)} being trained by another process: {' '.join(busy)}" if busy else "")
          + f"; index: {exp_dir / INDEX_JSONL}")
    return 1 if failed or busy else 0
