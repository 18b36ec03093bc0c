"""The training loop: one run's steps, each recorded (after backward, before the update), with
checkpoints and snapshots on their schedules. The run's directory, manifest and end-of-run analysis
are `runner.launch.train`'s."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from runner.config import Experiment
from runner.data.batches import NotebookSampler, make_sampler
from runner.data.corpus import Corpus
from runner.data.tokenizer import encode, save_tokenizer
from runner.layout import RunFiles
from runner.model.gpt2 import (
    batch_loss,
    build_model,
    causal_mask,
    count_parameters,
    mean_last_logits,
    parameters_sha256,
)
from runner.model.kernels import choose
from runner.recording.format import PARAMETER_FINGERPRINTS, header_metadata
from runner.recording.writer import RecordingWriter, RowSink
from runner.text import plural
from runner.training import checkpoint
from runner.training.optimizer import build_optimizer, clip_gradients, set_learning_rate
from runner.training.progress import Progress
from runner.training.resume import continue_with_threads_of, implementation, open_recording
from runner.training.snapshots import Snapshots

log = logging.getLogger(__name__)


def build_model_and_optimizer(exp: Experiment, device: torch.device
                              ) -> tuple[GPT2LMHeadModel, torch.optim.Optimizer, dict[str, str], dict]:
    """The model, its optimizer, the `implementation` that produced them, and what run.json says of
    the optimizer."""
    kernels = choose(exp.train.precision, device, exp.train.kernels)
    # (transformers types .to() without its self argument)
    model = build_model(exp.model, exp.train.seed, kernels).to(device)  # type: ignore[arg-type]
    if exp.train.precision == "bf16-true":
        model.to(torch.bfloat16)  # parameters, gradients and Adam's moments all in bf16
    optimizer, description = build_optimizer(model, exp.train, kernels)
    return model, optimizer, implementation(kernels), description


@functools.lru_cache(maxsize=2)
def _tokens(corpus: Corpus) -> torch.Tensor:
    """The encoded book, kept for the next run in this process (a sweep's worker trains several;
    encoding costs ~0.17 s). Samplers only read it."""
    return encode(corpus.text)


def train(exp: Experiment, run_dir: Path, corpus: Corpus, torch_device: torch.device, threads: int,
          progress: bool, restart: bool, env: dict, started_at: str,
          after_checkpoint: Callable[[int], None] | None = None,
          sink: RowSink | None = None) -> tuple[dict, GPT2LMHeadModel]:
    """Train `exp` into `run_dir`'s recording, from its checkpoint unless `restart`; `after_checkpoint(step)`
    is called after each checkpoint is saved, `sink` told of the recording's rows as they land.
    Returns what run.json says of the training, and the trained model."""
    t0 = time.perf_counter()
    cfg = exp.train
    torch.set_num_threads(threads)
    sampler = make_sampler(cfg.batch_order, _tokens(corpus), exp.model.context_length, cfg.batch_size, cfg.seed)
    save_tokenizer(RunFiles(run_dir).tokenizer)
    model, optimizer, impl, optimizer_description = build_model_and_optimizer(exp, torch_device)
    n_params = count_parameters(model)
    header = {**header_metadata(exp, corpus, env, started_at, n_params, str(torch_device)),
              "implementation": json.dumps(impl, sort_keys=True),
              PARAMETER_FINGERPRINTS["initial"]: parameters_sha256(model)}  # before a checkpoint is loaded
    writer, ckpt = open_recording(exp, run_dir, model, optimizer, restart, header, torch_device, sink)
    start, train_s_before = (ckpt.step + 1, ckpt.train_s) if ckpt else (1, 0.0)
    losses = torch.empty(cfg.steps, device=torch_device)
    if ckpt:
        continue_with_threads_of(ckpt, exp.run_id)
        losses[:ckpt.step] = ckpt.losses
    log.info("run %s: %s parameters, device %s, precision %s, %s%s", exp.run_id, f"{n_params:,}",
             torch_device, cfg.precision, plural(torch.get_num_threads(), "thread"),
             f", resuming after step {ckpt.step}" if ckpt else "")
    mask = causal_mask(model, exp.model.context_length, torch_device)
    autocast = torch.autocast(torch_device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16-mixed")
    snapshots = Snapshots(run_dir, exp)
    bar = Progress(exp, run_dir, start, progress)
    t_train = time.perf_counter()
    checkpointer = checkpoint.Checkpointer(run_dir, exp, before_save=writer.flush,
                                           clock=lambda: train_s_before + time.perf_counter() - t_train,
                                           recording_digests=writer.digest_state, after_save=after_checkpoint)
    try:
        snapshots.after_step(start - 1, model)  # step 0's, when scheduled
        if start == 1 and isinstance(sampler, NotebookSampler):
            _record_dummy_row(writer, model, optimizer, sampler, mask, autocast, exp, torch_device)
        for step, (inputs, targets) in zip(range(start, cfg.steps + 1), sampler.batches(start), strict=False):
            inputs, targets = inputs.to(torch_device, non_blocking=True), targets.to(torch_device, non_blocking=True)
            logits, loss = batch_loss(model, inputs, targets, mask, autocast, cfg.targets)
            loss.backward()
            grad_norm = clip_gradients(model, cfg.grad_clip) if cfg.grad_clip is not None else None
            lr = cfg.learning_rate(step) if cfg.lr_varies else None  # set and recorded only when it varies
            if lr is not None:
                set_learning_rate(optimizer, lr)
            writer.record(step, {**_matrices(model, optimizer), "logits": mean_last_logits(logits, cfg.kernels),
                                 "loss": loss, "lr": None if lr is None else torch.tensor(lr), "grad_norm": grad_norm})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[step - 1] = loss.detach()
            snapshots.after_step(step, model)
            checkpointer.after_step(step, model, optimizer, losses)
            bar.update(step, losses, writer.rows_written)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    result = {"device": str(torch_device), "threads": torch.get_num_threads(), "n_params": n_params,
              "implementation": impl, "optimizer": optimizer_description,
              **_finish(exp, run_dir, model, optimizer, writer, losses, checkpointer.clock(), t0),
              "snapshots": snapshots.saved()}
    if ckpt:
        result["resumed_from_step"] = ckpt.step
    return result, model


def _matrices(model: GPT2LMHeadModel, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor | None]:
    """W (the unembedding; tied, also the embedding), its gradient (as the update will use it:
    clipped) and Adam's moments before the update; the same for E when the embeddings are untied."""
    matrices = [(model.lm_head.weight, ("W", "grads", "momentum", "variance"))]
    if not model.config.tie_word_embeddings:
        matrices.append((model.transformer.wte.weight, ("E", "E_grads", "E_momentum", "E_variance")))
    found: dict[str, torch.Tensor | None] = {}
    for matrix, names in matrices:
        state = optimizer.state.get(matrix, {})
        found.update(zip(names, (matrix, matrix.grad, state.get("exp_avg"), state.get("exp_avg_sq")), strict=True))
    return found


@torch.no_grad()
def _record_dummy_row(writer: RecordingWriter, model, optimizer, sampler: NotebookSampler, mask, autocast,
                      exp: Experiment, device: torch.device) -> None:
    """The notebook's row 0: the initial W (and E) and the logits of its dummy batch (the first batch
    of a first, discarded DataLoader iterator); loss[0], which the notebook left 0, is that batch's loss."""
    inputs, targets = (t.to(device) for t in sampler.dummy_batch())
    logits, loss = batch_loss(model, inputs, targets, mask, autocast, exp.train.targets)
    writer.record_initial({**_matrices(model, optimizer), "logits": mean_last_logits(logits, exp.train.kernels),
                           "loss": loss})


def _finish(exp: Experiment, run_dir: Path, model, optimizer, writer: RecordingWriter, losses: torch.Tensor,
            train_s: float, t0: float) -> dict:
    """The end of training: the final state and metrics into the recording, which is then published
    (and the checkpoint, no longer needed, removed). Returns these for run.json."""
    finals = {f"{name}_final": value for name, value in _matrices(model, optimizer).items()
              if value is not None and name in ("W", "momentum", "variance", "E", "E_momentum", "E_variance")}
    metrics = {"final_loss": losses[-1].item(), "mean_loss_last_100": losses[-100:].mean().item(),
               "train_s": train_s, "steps_per_s": exp.train.steps / train_s, "wall_s": time.perf_counter() - t0}
    path = writer.close(finals,
                        {**{k: repr(v) for k, v in metrics.items()},
                         PARAMETER_FINGERPRINTS["final"]: parameters_sha256(model)})
    checkpoint.remove(run_dir)
    return {"metrics": metrics,
            "recording": {"path": path.name, "bytes": path.stat().st_size, **writer.format_summary()}}
