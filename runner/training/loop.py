"""Train one experiment and record every step. No Ray here: sweeps call `run()` inside a task."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import GPT2LMHeadModel

from runner.analysis.compare import PARAMETER_FINGERPRINTS
from runner.analysis.metrics import dead_token_summary, write_metrics
from runner.config import Experiment
from runner.data.batches import NotebookSampler, make_sampler
from runner.data.corpus import Corpus, load_corpus
from runner.data.tokenizer import build_tokenizer, encode, save_tokenizer
from runner.model.gpt2 import (
    batch_loss,
    build_model,
    causal_mask,
    count_parameters,
    mean_last_logits,
    parameters_sha256,
)
from runner.model.kernels import adam, choose
from runner.recording.verify import layout_problems, read_metadata
from runner.recording.writer import RecordingWriter, check_free_space, expected_layout, partial_path
from runner.runs.rundir import RECORDING, is_complete, read_manifest, run_lock, write_manifest
from runner.training import checkpoint
from runner.training.host import keep_freed_memory_mapped, resolve_device, thread_count
from runner.training.provenance import environment
from runner.training.snapshots import Snapshots

log = logging.getLogger(__name__)
progress_log = logging.getLogger("runner.progress")  # train.log only; the console has the bar

PROMPTS = ("In my younger", "Gatsby", "The green light")
SAMPLE_TOKENS, SAMPLE_TEMPERATURE = 50, 0.8


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _log_to(path: Path):
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger("runner")
    level = root.level
    root.setLevel(min(level or logging.WARNING, logging.INFO))  # the file gets INFO whatever the console shows
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def run(exp: Experiment, run_dir: Path, *, overrides: dict | None = None, device: str | None = None,
        threads: int | None = None, progress: bool = True, restart: bool = False, force: bool = True) -> dict:
    """Train `exp` into `run_dir` (recording, run.json, train.log); returns the manifest. An
    interrupted run continues from its last checkpoint unless `restart`. Without `force`, a run
    found complete once its lock is held (another process finished it) is not trained again.

    `device` overrides the config's; `threads` is the CPUs the caller offers (a sweep passes what
    Ray assigned; see `host.thread_count`). Bad input (corpus, device) raises before anything is
    written; a failure during training is written to run.json with its traceback and re-raised."""
    torch_device = resolve_device(device or exp.train.device)
    corpus = load_corpus(exp.corpus.path, exp.corpus.ascii)
    check_free_space(run_dir / RECORDING, exp)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        finished = None if force else read_manifest(run_dir)
        if finished is not None and is_complete(run_dir, exp):
            return finished
        if restart:
            partial_path(run_dir / RECORDING).unlink(missing_ok=True)
        return _run_locked(exp, run_dir, corpus, torch_device, overrides, thread_count(exp.train.threads, threads),
                           progress, restart)


def _run_locked(exp: Experiment, run_dir: Path, corpus: Corpus, torch_device: torch.device, overrides: dict | None,
                threads: int | None, progress: bool, restart: bool) -> dict:
    manifest: dict[str, Any] = {"run_id": exp.run_id, "name": exp.name, "status": "running",
                                "overrides": overrides or {}, "config": exp.to_dict(), "started_at": _now(),
                                "environment": environment(torch_device)}
    write_manifest(run_dir, manifest)
    with _log_to(run_dir / "train.log"):
        try:
            manifest.update(_train(exp, run_dir, corpus, torch_device, threads, progress, restart,
                                   manifest["environment"], manifest["started_at"]))
            manifest["status"] = "complete"
        except BaseException as e:
            manifest.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            log.error("run %s failed: %s", exp.run_id, manifest["error"])
            raise
        finally:
            manifest["ended_at"] = _now()
            write_manifest(run_dir, manifest)
    return manifest


def _continue_with_threads_of(ckpt: checkpoint.Checkpoint, run_id: str) -> None:
    """A resumed run trains on with the thread count it started with, whatever it is offered now:
    torch splits reductions by thread, so mixing counts would mix bits."""
    if ckpt.threads is None:
        log.warning("run %s: its checkpoint does not record a thread count; continuing with %d threads, "
                    "so the result may differ in the last bits from an uninterrupted run", run_id,
                    torch.get_num_threads())
    elif ckpt.threads != torch.get_num_threads():
        log.warning("run %s: resuming with the %d threads it started with (offered %d)", run_id, ckpt.threads,
                    torch.get_num_threads())
        torch.set_num_threads(ckpt.threads)
        if torch.get_num_threads() != ckpt.threads:
            raise RuntimeError(f"run {run_id}: cannot resume with the {ckpt.threads} threads it started with "
                               f"(torch runs {torch.get_num_threads()}); --restart trains it again from step 0")


def build_model_and_optimizer(exp: Experiment, device: torch.device
                              ) -> tuple[GPT2LMHeadModel, torch.optim.Optimizer, dict[str, str]]:
    """The model, its optimizer, and the implementation choices that produced them (kernels and
    host allocator; recorded, since they change rounding)."""
    kernels = choose(exp.train.precision, device, exp.train.kernels)
    # (transformers types .to() without its self argument)
    model = build_model(exp.model, exp.train.seed, kernels).to(device)  # type: ignore[arg-type]
    if exp.train.precision == "bf16-true":
        model.to(torch.bfloat16)  # parameters, gradients and Adam's moments all in bf16
    optimizer = adam(model.parameters(), kernels, exp.train.lr, exp.train.betas, exp.train.eps)
    return model, optimizer, {**kernels.as_dict(), "host_allocator": keep_freed_memory_mapped()}


def _open_recording(exp: Experiment, run_dir: Path, model, optimizer, restart: bool, header: dict,
                    device: torch.device) -> tuple[RecordingWriter, checkpoint.Checkpoint | None]:
    """Continue from the run's checkpoint when it and the partial recording are usable, else start over."""
    path = run_dir / RECORDING
    resumable = not restart and (run_dir / checkpoint.CHECKPOINT).exists()
    if resumable and layout_problems(partial_path(path), expected_layout(exp)):
        log.warning("run %s: a checkpoint but no usable partial recording; starting over", exp.run_id)
        resumable = False
    elif resumable and (before := read_metadata(partial_path(path)).get("implementation")) != header["implementation"]:
        log.warning("run %s: started with other kernels (%s; now %s): the bits would mix, so starting over",
                    exp.run_id, before, header["implementation"])
        resumable = False
    ckpt = checkpoint.load(run_dir, exp.run_id, model, optimizer) if resumable else None
    if ckpt is None:
        checkpoint.remove(run_dir)
    first_row = ckpt.step // exp.record.every + 1 if ckpt else 0
    writer = RecordingWriter(path, exp, metadata=header, device=device, first_row=first_row)
    return writer, ckpt


class _Progress:
    """The console bar, and a line in train.log 20 times per run (one host sync per line, not per step)."""

    def __init__(self, exp: Experiment, start: int, enabled: bool):
        self.steps, self.start, self.every = exp.train.steps, start, max(1, exp.train.steps // 20)
        self.bar = tqdm(total=self.steps, initial=start - 1, desc=f"{exp.name}/{exp.run_id}", unit="step",
                        disable=not enabled, mininterval=1.0, dynamic_ncols=True)
        self.t_start = time.perf_counter()

    def update(self, step: int, losses: torch.Tensor) -> None:
        if step % self.every == 0 or step == self.steps:
            current = losses[step - 1].item()
            self.bar.set_postfix(loss=f"{current:.4f}", refresh=False)
            progress_log.info("step %d/%d loss %.4f %.1f steps/s", step, self.steps, current,
                              (step - self.start + 1) / (time.perf_counter() - self.t_start))
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


@functools.lru_cache(maxsize=2)
def _tokens(corpus: Corpus) -> torch.Tensor:
    """The encoded book, kept for the next run in this process (a sweep's worker trains several;
    encoding costs ~0.17 s). Samplers only read it."""
    return encode(corpus.text)


def _train(exp: Experiment, run_dir: Path, corpus: Corpus, torch_device: torch.device, threads: int | None,
           progress: bool, restart: bool, env: dict, started_at: str) -> dict:
    t0 = time.perf_counter()
    cfg = exp.train
    if threads:
        torch.set_num_threads(threads)
    sampler = make_sampler(cfg.batch_order, _tokens(corpus), exp.model.context_length, cfg.batch_size, cfg.seed)
    save_tokenizer(run_dir / "tokenizer")
    model, optimizer, impl = build_model_and_optimizer(exp, torch_device)
    n_params = count_parameters(model)
    header = {**_recording_metadata(exp, corpus, env, started_at, n_params, torch_device),
              "implementation": json.dumps(impl, sort_keys=True),
              PARAMETER_FINGERPRINTS["initial"]: parameters_sha256(model)}  # before a checkpoint is loaded
    writer, ckpt = _open_recording(exp, run_dir, model, optimizer, restart, header, torch_device)
    start, train_s_before = (ckpt.step + 1, ckpt.train_s) if ckpt else (1, 0.0)
    losses = torch.empty(cfg.steps, device=torch_device)
    if ckpt:
        _continue_with_threads_of(ckpt, exp.run_id)
        losses[:ckpt.step] = ckpt.losses
    log.info("run %s: %s parameters, device %s, precision %s, %d threads%s", exp.run_id, f"{n_params:,}",
             torch_device, cfg.precision, torch.get_num_threads(), f", resuming after step {ckpt.step}" if ckpt else "")
    W = model.lm_head.weight  # tied: the same Parameter as transformer.wte.weight
    mask = causal_mask(model, exp.model.context_length, torch_device)
    autocast = torch.autocast(torch_device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16-mixed")
    snapshots = Snapshots(run_dir, exp)
    bar = _Progress(exp, start, progress)
    t_train = time.perf_counter()
    checkpointer = checkpoint.Checkpointer(run_dir, exp, before_save=writer.flush,
                                           train_s=lambda: train_s_before + time.perf_counter() - t_train)
    try:
        snapshots.after_step(start - 1, model)  # step 0's, when scheduled
        if start == 1 and isinstance(sampler, NotebookSampler):
            _record_dummy_row(writer, model, sampler, mask, autocast, exp, torch_device)
        for step, (inputs, targets) in zip(range(start, cfg.steps + 1), sampler.batches(start), strict=False):
            inputs, targets = inputs.to(torch_device, non_blocking=True), targets.to(torch_device, non_blocking=True)
            logits, loss = batch_loss(model, inputs, targets, mask, autocast, cfg.targets)
            loss.backward()
            state = optimizer.state.get(W, {})  # recorded after backward, before the update
            writer.record(step, {"W": W, "grads": W.grad, "momentum": state.get("exp_avg"),
                                 "variance": state.get("exp_avg_sq"), "logits": mean_last_logits(logits, cfg.kernels),
                                 "loss": loss})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[step - 1] = loss.detach()
            snapshots.after_step(step, model)
            checkpointer.after_step(step, model, optimizer, losses)
            bar.update(step, losses)
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    result = {"device": str(torch_device), "threads": torch.get_num_threads(), "n_params": n_params,
              "implementation": impl,
              **_finish(exp, run_dir, corpus, model, optimizer, writer, losses, checkpointer.train_s(), t0),
              "snapshots": snapshots.saved()}
    if ckpt:
        result["resumed_from_step"] = ckpt.step
    return result


@torch.no_grad()
def _record_dummy_row(writer: RecordingWriter, model, sampler: NotebookSampler, mask, autocast, exp: Experiment,
                      device: torch.device) -> None:
    """The notebook's row 0: the initial W and the logits of its dummy batch (the first batch of a
    first, discarded DataLoader iterator); loss[0], which the notebook left 0, is that batch's loss."""
    inputs, targets = (t.to(device) for t in sampler.dummy_batch())
    logits, loss = batch_loss(model, inputs, targets, mask, autocast, exp.train.targets)
    writer.record_initial({"W": model.lm_head.weight, "logits": mean_last_logits(logits, exp.train.kernels),
                           "loss": loss})


def _finish(exp: Experiment, run_dir: Path, corpus: Corpus, model, optimizer, writer: RecordingWriter,
            losses: torch.Tensor, train_s: float, t0: float) -> dict:
    """The end of a run: the final state and metrics into the recording, which is then published;
    the per-step metrics table, the dead-token summary and text samples. Returns these for run.json."""
    W = model.lm_head.weight
    state = optimizer.state[W]
    metrics = {"final_loss": losses[-1].item(), "mean_loss_last_100": losses[-100:].mean().item(),
               "train_s": train_s, "steps_per_s": exp.train.steps / train_s, "wall_s": time.perf_counter() - t0}
    path = writer.close({"W_final": W, "momentum_final": state["exp_avg"], "variance_final": state["exp_avg_sq"]},
                        {**{k: repr(v) for k, v in metrics.items()},
                         PARAMETER_FINGERPRINTS["final"]: parameters_sha256(model)})
    checkpoint.remove(run_dir)
    write_metrics(run_dir)
    summary = dead_token_summary(W.detach().float().cpu().numpy(), corpus.token_counts)
    samples = sample_text(model.float(), seed=exp.train.seed, device=W.device)
    for prompt, text in samples.items():
        log.info("sample %r -> %r", prompt, text)
    log.info("run %s complete: final loss %.4f, %.1f steps/s, %s", exp.run_id, metrics["final_loss"],
             metrics["steps_per_s"], path)
    return {"corpus": _corpus_summary(corpus), "metrics": metrics, "samples": samples, "dead_token_summary": summary,
            "recording": {"path": RECORDING, "bytes": path.stat().st_size}}


def _corpus_summary(corpus: Corpus) -> dict:
    counts = corpus.token_counts
    return {"source": corpus.source, "ascii": corpus.mode, "length": len(corpus.text), "sha256": corpus.sha256,
            "dropped": corpus.dropped, "replaced": corpus.replaced, "token_counts": counts,
            "dead_tokens": [i for i, c in enumerate(counts) if c == 0]}


def _recording_metadata(exp: Experiment, corpus: Corpus, env: dict, started_at: str, n_params: int,
                        device: torch.device) -> dict[str, str]:
    """Header metadata (safetensors allows only strings; structured values are JSON)."""
    return {"run_id": exp.run_id, "config": json.dumps(exp.to_dict(), sort_keys=True),
            "seed": str(exp.train.seed), "precision": exp.train.precision, "device": str(device),
            "steps": str(exp.train.steps), "record_every": str(exp.record.every), "n_params": str(n_params),
            "packages": json.dumps(env["packages"], sort_keys=True), "python": env["python"],
            "git_commit": env["git_commit"], "corpus_sha256": corpus.sha256,
            "corpus_length": str(len(corpus.text)), "corpus_ascii": corpus.mode,
            "token_counts": json.dumps(corpus.token_counts), "started_at": started_at, "cpu": env["cpu"],
            "cpu_capability": env["cpu_capability"], **({"gpu": env["gpu"]} if env["gpu"] else {})}


@torch.no_grad()
def sample_text(model, *, seed: int, device: torch.device) -> dict[str, str]:
    """Temperature-0.8 samples (no top-k) of up to 50 new tokens per prompt, seeded by the run seed.
    Sampling runs in fp32 (the final weights upcast exactly): bf16 kernels for every new sequence
    length would cost more memory than the whole training loop."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model.eval()
    samples = {}
    for prompt in PROMPTS:
        ids = encode(prompt)[None].to(device)
        new_tokens = min(SAMPLE_TOKENS, model.config.n_positions - ids.shape[1])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=True,
                             temperature=SAMPLE_TEMPERATURE, top_k=0, pad_token_id=tokenizer.pad_token_id)
        samples[prompt] = str(tokenizer.decode(out[0]))
    return samples
