"""Checkpoints: everything a run needs to continue bit-exactly, as a safetensors file (no pickles).

Saved every `train.checkpoint_every` steps, after the recording rows written so far are on disk:
the parameters, Adam's state, the RNG states, the losses so far, the step and torch's thread count. The batch order is
a pure function of (seed, step), so the step is the sampler's position. Written to a temporary
file and renamed, so a crash during the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize

from runner.config import Experiment
from runner.errors import UserError
from runner.files import atomic_path
from runner.layout import RunFiles

log = logging.getLogger(__name__)
RECORDING_DIGESTS = "recording_digests"  # the checkpoint's metadata key
T = TypeVar("T")
progress_log = logging.getLogger("runner.progress")  # train.log only
READ_ATTEMPTS, RETRY_S = 3, 1.0


class CheckpointUnreadable(UserError):
    """The checkpoint exists but could not be read, even after retries."""


@dataclass
class Checkpoint:
    step: int  # the last completed step: parameters and Adam state are after its update
    train_s: float  # training seconds spent up to `step` (over all attempts)
    losses: torch.Tensor  # losses of steps 1..step
    threads: int | None  # torch's thread count the run trained with (it changes the bits); None: not recorded
    recording_digests: dict | None  # the digests of the recording's rows up to `step`; None: not recorded


class Checkpointer:
    """Saves the run's checkpoint every `train.checkpoint_every` steps, but not after the last step
    (the run is complete then). `before_save` makes the recording's rows so far durable first;
    `after_save(step)`, when given, ships the checkpoint elsewhere (a bucket); `clock()` tells the
    training seconds so far (over all attempts)."""

    def __init__(self, run_dir: Path, exp: Experiment, *, before_save: Callable[[], None],
                 clock: Callable[[], float], recording_digests: Callable[[], dict],
                 after_save: Callable[[int], None] | None = None):
        self.run_dir, self.run_id = run_dir, exp.run_id
        self.every, self.steps = exp.train.checkpoint_every, exp.train.steps
        self.before_save, self.after_save, self.clock = before_save, after_save, clock
        self.recording_digests = recording_digests

    def after_step(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   losses: torch.Tensor) -> None:
        if step % self.every or step >= self.steps:
            return
        t_start = time.perf_counter()
        self.before_save()
        save(self.run_dir, self.run_id, step, self.clock(), model, optimizer, losses, self.recording_digests())
        if self.after_save is not None:
            self.after_save(step)
        progress_log.info("checkpoint at step %d (%.3f s)", step, time.perf_counter() - t_start)


def save(run_dir: Path, run_id: str, step: int, train_s: float, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer, losses: torch.Tensor, recording_digests: dict) -> None:
    """The checkpoint after `step`, with the digests of the recording's rows written up to it (a
    resume checks the partial recording against them before it writes on)."""
    tensors = {f"param.{name}": p.detach().cpu() for name, p in model.named_parameters()}
    for i, p in enumerate(model.parameters()):
        for key, value in optimizer.state[p].items():
            tensors[f"adam.{i}.{key}"] = value.detach().cpu()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    tensors["losses"] = losses[:step].detach().cpu()
    files = RunFiles(run_dir)
    # serialized here and written by atomic_path: safetensors' save_file writes a `.tmpXXXXXX` of its
    # own beside the target, which a SIGKILL leaves in the run directory
    with atomic_path(files.checkpoint, files.checkpoint_tmp) as tmp:
        tmp.write_bytes(serialize({k: v.contiguous() for k, v in tensors.items()},
                                  metadata={"run_id": run_id, "step": str(step), "train_s": repr(train_s),
                                            "threads": str(torch.get_num_threads()),
                                            RECORDING_DIGESTS: json.dumps(recording_digests, separators=(",", ":"))}))


def load(run_dir: Path, run_id: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint | None:
    """Restore model, optimizer and RNG from the run's checkpoint; None when there is none (or it
    is another run's). A checkpoint that cannot be read is retried, then fails the run (`_read`)."""
    def read(f) -> tuple[dict, dict] | None:
        meta = f.metadata() or {}
        return (meta, {k: f.get_tensor(k) for k in f.keys()}) if meta.get("run_id") == run_id else None

    found = _read(run_dir, read)
    if found is None:
        return None
    meta, tensors = found
    device = next(model.parameters()).device
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[f"param.{name}"])
    for i, p in enumerate(model.parameters()):
        prefix = f"adam.{i}."
        optimizer.state[p] = {k[len(prefix):]: (v if k.endswith(".step") else v.to(device))
                              for k, v in tensors.items() if k.startswith(prefix)}
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return Checkpoint(step=int(meta["step"]), train_s=float(meta["train_s"]), losses=tensors["losses"].to(device),
                      threads=int(meta["threads"]) if "threads" in meta else None,
                      recording_digests=json.loads(meta[RECORDING_DIGESTS]) if RECORDING_DIGESTS in meta else None)


def recording_digests(run_dir: Path) -> dict | None:
    """The digests of the recording's rows the checkpoint relies on; None without a checkpoint, or
    for one written before they were kept."""
    value = _read(run_dir, lambda f: (f.metadata() or {}).get(RECORDING_DIGESTS))
    return json.loads(value) if value else None


def _read(run_dir: Path, read: Callable[[Any], T | None]) -> T | None:
    """`read(f)` of the run's checkpoint opened with safetensors; None when there is none. A
    checkpoint that cannot be read is retried and then fails the run, kept: a transient error (a
    network volume, a flaky disk) must not cost the run its progress."""
    path = RunFiles(run_dir).checkpoint
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            with safe_open(str(path), framework="pt") as f:
                return read(f)
        except FileNotFoundError:
            return None
        except Exception as e:  # safetensors' own error types, OSError
            if attempt == READ_ATTEMPTS:
                raise CheckpointUnreadable(f"{path}: cannot read the checkpoint after {attempt} tries ({e}); it is "
                                           f"kept: fix the storage and train again, or --restart from step 0") from e
            log.warning("%s: reading the checkpoint failed (%s); retrying", path, e)
            time.sleep(RETRY_S * attempt)
    raise AssertionError("unreachable")


def remove(run_dir: Path) -> None:
    files = RunFiles(run_dir)
    for path in (files.checkpoint, files.checkpoint_tmp):
        path.unlink(missing_ok=True)
