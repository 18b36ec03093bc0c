"""The training loop never waits for the GPU between log lines: checked on CUDA (skipped without an
NVIDIA GPU), with the guard that does it exercised on the CPU, so a change to the loop's calls of
`Progress` fails here on any machine instead of only on a GPU."""

import pytest
import torch

from runner.launch.train import run
from runner.training.progress import Progress


def guard_progress(monkeypatch, set_mode) -> list[int]:
    """Patch `Progress` so that `set_mode("error")` holds from its creation to its close, lifted
    (`set_mode("default")`) only while a log line reads the loss; returns the steps that logged."""
    real_init, real_update, real_close = Progress.__init__, Progress.update, Progress.close
    logged: list[int] = []

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        set_mode("error")

    def update(self, step, *args, **kwargs):
        if step % self.every and step != self.steps:
            return real_update(self, step, *args, **kwargs)
        set_mode("default")
        real_update(self, step, *args, **kwargs)
        logged.append(step)
        set_mode("error")

    def close(self):
        set_mode("default")
        real_close(self)

    monkeypatch.setattr(Progress, "__init__", init)
    monkeypatch.setattr(Progress, "update", update)
    monkeypatch.setattr(Progress, "close", close)
    return logged


def _train(make_experiment, tmp_path, device: str) -> dict:
    exp = make_experiment(train={"steps": 60, "device": device, "checkpoint_every": 1000},
                          record={"model_steps": "none"})
    return run(exp, tmp_path, progress=False)


def test_the_guard_sees_every_progress_call_of_the_loop(make_experiment, tmp_path, monkeypatch):
    modes: list[str] = []
    logged = guard_progress(monkeypatch, modes.append)
    assert _train(make_experiment, tmp_path, "cpu")["status"] == "complete"
    assert logged == list(range(3, 61, 3))  # 20 log lines, two unlogged steps between each
    assert modes == ["error"] + ["default", "error"] * 20 + ["default"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_loop_does_not_synchronise_between_log_lines(make_experiment, tmp_path, monkeypatch):
    """torch.cuda.set_sync_debug_mode("error") from the first step to the last, lifted only while a
    log line reads the loss (its one intended synchronisation): any other synchronising call in the
    loop (a .item(), a blocking copy to the host, a stream synchronisation) raises."""
    def set_mode(mode: str) -> None:
        if mode == "error":
            torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(mode)

    logged = guard_progress(monkeypatch, set_mode)
    try:
        manifest = _train(make_experiment, tmp_path, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert manifest["status"] == "complete" and manifest["device"].startswith("cuda")
    assert logged == list(range(3, 61, 3))
