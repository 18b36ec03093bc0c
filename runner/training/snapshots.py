"""Whole-model snapshots on a schedule (`record.model_steps`), in Hugging Face format, so that
transformers, TransformerLens and other interpretability tools load them as they are.

`models/step-<N>/` holds the model after step N's update (step 0: the initial model) and the
tokenizer. A snapshot is written under a temporary name and renamed: it is complete or absent.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel
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
    """Saves the model at the scheduled steps; a resumed run keeps the snapshots it already has
    (the same bits: training is deterministic)."""

    def __init__(self, run_dir: Path, exp: Experiment):
        self.run_dir = run_dir
        self.steps = set(snapshot_steps(exp.record.model_steps, exp.train.steps))
        hf_logging.disable_progress_bar()  # "Writing model shards" bars would break the run's own

    def after_step(self, step: int, model: PreTrainedModel) -> None:
        final = snapshot_dir(self.run_dir, step)
        if step not in self.steps or final.exists():
            return
        with atomic_path(final, partial(final)) as being_written:
            model.save_pretrained(being_written)
            save_tokenizer(being_written)

    def saved(self) -> list[str]:
        return sorted((p.name for p in RunFiles(self.run_dir).models.glob("step-*") if not p.name.endswith(PARTIAL)),
                      key=lambda name: int(name.removeprefix("step-")))
