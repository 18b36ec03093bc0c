"""A run's progress while it trains: the console bar, a line in train.log, and `progress.json`.

`progress.json` in the run directory is the channel a sweep's driver reads
(`runner.runs.rundir.read_progress`; docs/recording.md):
`{"step": 500, "steps": 10000, "loss": 2.4312, "steps_per_s": 37.9, "rows_written": 448}`, replaced
whole at most 20 times per run and at its last step (`rows_written`: the rows of the partial
recording already in the file, which a report of the running run reads). Each update costs one
host sync (the loss), never one per step.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from runner.config import Experiment
from runner.files import write_atomic
from runner.layout import RunFiles

if TYPE_CHECKING:
    import torch

UPDATES_PER_RUN = 20
progress_log = logging.getLogger("runner.progress")  # train.log only; the console has the bar


class Progress:
    def __init__(self, exp: Experiment, run_dir: Path, start: int, enabled: bool):
        """`start`: the first step this process trains (a resumed run starts after its checkpoint)."""
        self.path, self.steps, self.start = RunFiles(run_dir).progress, exp.train.steps, start
        self.every = -(-self.steps // UPDATES_PER_RUN)
        self.bar = tqdm(total=self.steps, initial=start - 1, desc=f"{exp.name}/{exp.run_id}", unit="step",
                        disable=not enabled, mininterval=1.0, dynamic_ncols=True)
        self.t_start = time.perf_counter()

    def update(self, step: int, losses: torch.Tensor, rows_written: int) -> None:
        """After step `step`; `losses[step - 1]` is its loss."""
        if step % self.every == 0 or step == self.steps:
            current = {"step": step, "steps": self.steps, "loss": round(losses[step - 1].item(), 6),
                       "steps_per_s": round((step - self.start + 1) / (time.perf_counter() - self.t_start), 3),
                       "rows_written": rows_written}
            self.bar.set_postfix(loss=f"{current['loss']:.4f}", refresh=False)
            progress_log.info("step %d/%d loss %.4f %.1f steps/s", step, self.steps, current["loss"],
                              current["steps_per_s"])
            write_atomic(self.path, json.dumps(current) + "\n")
        self.bar.update()

    def close(self) -> None:
        self.bar.close()

