"""Whole-model snapshots on a schedule (`record.model_steps`), in Hugging Face format, so that
transformers, TransformerLens and other interpretability tools load them as they are.

`models/step-<N>/` holds the model after step N's update (step 0: the initial model) and the
tokenizer. A snapshot is written under a temporary name and renamed: it is complete or absent.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_NAME
from transformers.utils import logging as hf_logging

from runner.config import Experiment
from runner.data.tokenizer import save_tokenizer
from runner.files import atomic_path
from runner.layout import PARTIAL, RunFiles, partial

PYTHIA_EARLY_STEPS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # EleutherAI Pythia's log-spaced checkpoints
PYTHIA_EVERY = 1000


def snapshot_steps(schedule: str | tuple[int, ...], steps: int) -> list[int]:
    """The steps a schedule snapshots in a run of `steps` steps."""
    if isinstance(schedule, tuple):
        return sorted(schedule)
    if schedule == "none":
        return []
    if schedule == "final":
        return [steps]
    # "pythia"
    return sorted({s for s in PYTHIA_EARLY_STEPS if s <= steps} | set(range(PYTHIA_EVERY, steps + 1, PYTHIA_EVERY))
                  | {steps})


def snapshot_dir(run_dir: Path, step: int) -> Path:
    return RunFiles(run_dir).snapshot(step)


class Snapshots:
    """Saves the model at the scheduled steps. A snapshot already there (a resumed run's, or one
    left by another run) is kept only if its weights are this model's, byte for byte: checked,
    not assumed."""

    def __init__(self, run_dir: Path, exp: Experiment):
        self.run_dir = run_dir
        self.steps = set(snapshot_steps(exp.record.model_steps, exp.train.steps))
        hf_logging.disable_progress_bar()  # "Writing model shards" bars would break the run's own

    def after_step(self, step: int, model: PreTrainedModel) -> None:
        if step not in self.steps:
            return
        final = snapshot_dir(self.run_dir, step)
        if final.exists():
            if holds_model(final, model):
                return
            shutil.rmtree(final)  # another model's
        with atomic_path(final, partial(final)) as being_written:
            model.save_pretrained(being_written)
            save_tokenizer(being_written)

    def saved(self) -> list[str]:
        return sorted((p.name for p in RunFiles(self.run_dir).models.glob("step-*") if not p.name.endswith(PARTIAL)),
                      key=lambda name: int(name.removeprefix("step-")))


def holds_model(snapshot: Path, model: PreTrainedModel) -> bool:
    """Whether the snapshot's weights are `model`'s, every tensor bit for bit (a tied matrix is
    saved once: its twin counts as saved)."""
    try:
        saved = load_file(snapshot / SAFE_WEIGHTS_NAME)
    except (OSError, SafetensorError):
        return False
    state = model.state_dict()
    saved_storage = {state[name].data_ptr() for name in saved if name in state}
    return (all(name in state and tensor.dtype == state[name].dtype
                and torch.equal(tensor.view(torch.uint8), state[name].detach().cpu().contiguous().view(torch.uint8))
                for name, tensor in saved.items())
            and all(name in saved or t.data_ptr() in saved_storage for name, t in state.items()))
