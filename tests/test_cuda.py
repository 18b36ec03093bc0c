"""CUDA only (skipped without an NVIDIA GPU): the training loop never waits for the GPU between log lines."""

import pytest
import torch

from runner.launch.train import run
from runner.training.progress import Progress

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_training_loop_does_not_synchronise_between_log_lines(make_experiment, tmp_path, monkeypatch):
    """torch.cuda.set_sync_debug_mode("error") from the first step to the last, lifted only while a
    log line reads the loss (its one intended synchronisation): any other synchronising call in the
    loop (a .item(), a blocking copy to the host, a stream synchronisation) raises."""
    progress = Progress
    real_init, real_update, real_close = progress.__init__, progress.update, progress.close
    logged = []

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def update(self, step, losses):
        if step % self.every and step != self.steps:
            return real_update(self, step, losses)
        torch.cuda.set_sync_debug_mode("default")
        real_update(self, step, losses)
        logged.append(step)
        torch.cuda.set_sync_debug_mode("error")

    def close(self):
        torch.cuda.set_sync_debug_mode("default")
        real_close(self)

    monkeypatch.setattr(progress, "__init__", init)
    monkeypatch.setattr(progress, "update", update)
    monkeypatch.setattr(progress, "close", close)
    exp = make_experiment(train={"steps": 60, "device": "cuda", "checkpoint_every": 1000},
                          record={"model_steps": "none"})
    try:
        manifest = run(exp, tmp_path, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert manifest["status"] == "complete" and manifest["device"].startswith("cuda")
    assert logged == list(range(3, 61, 3))  # 20 log lines, two unsynchronised steps between each
