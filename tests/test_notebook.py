"""1.12a exactly as it ran: experiments/notebook_1_12a.yaml against the notebook's own loop, to the bit."""

import subprocess
import sys

import pytest
import torch

from runner.config import load_runs
from runner.data.batches import NotebookSampler
from runner.launch.train import run
from runner.layout import RECORDING

from conftest import REPO, load_recording

pytestmark = pytest.mark.slow
# 267 characters: 139 windows of 129 tokens, 4 batches of 32 and one of 11 per epoch; 14 steps cross two epochs
TINY = ("In my younger and more vulnerable years my father gave me some advice that I've been turning over in my "
        "mind ever since. Whenever you feel like criticizing anyone, he told me, just remember that all the "
        "people in this world haven't had the advantages that you've had.")


@pytest.fixture(scope="module")
def tiny_book(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.txt"
    path.write_text(TINY)
    return path


def test_notebook_sampler_is_the_dataloaders_order():
    """The vectorised order equals torch's DataLoader over a per-item dataset, iterators drawn as the notebook did."""
    tokens = torch.arange(1000, 1000 + 60)  # 50 windows of 10 + 1 tokens: batches of 8, 8, ..., 2 per epoch
    loader = torch.utils.data.DataLoader([(tokens[i:i + 10], tokens[i + 1:i + 11]) for i in range(50)], batch_size=8,
                                         shuffle=True, generator=torch.Generator().manual_seed(3))
    dummy = next(iter(loader))
    expected, batches = [], iter(loader)
    while len(expected) < 20:  # three epochs of 7 batches
        try:
            expected.append(next(batches))
        except StopIteration:
            batches = iter(loader)
    sampler = NotebookSampler(tokens, 10, 8, 3)
    assert all(torch.equal(a, b) for a, b in zip(sampler.dummy_batch(), dummy, strict=True))
    for first_step in (1, 7, 8, 15):  # a resume at any step, the partial batch and epoch starts included
        got = list(zip(range(first_step, 21), sampler.batches(first_step), strict=False))
        for step, (inputs, targets) in got:
            assert torch.equal(inputs, expected[step - 1][0]) and torch.equal(targets, expected[step - 1][1]), step
    assert [len(b[0]) for b in expected[:7]] == [8] * 6 + [2]


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=pytest.mark.long), "fp32"])
def test_notebook_experiment_equals_the_notebooks_loop(tiny_book, tmp_path, precision):
    steps = 14
    loop = tmp_path / "loop.safetensors"
    subprocess.run([sys.executable, str(REPO / "bench" / "notebook_loop.py"), "--steps", str(steps), "--precision",
                    precision, "--corpus", str(tiny_book), "--out", str(loop)], check=True, capture_output=True)
    overrides = [f"train.steps={steps}", f"corpus.path={tiny_book}", "train.device=cpu",
                 f"train.precision={'bf16-true' if precision == 'bf16' else 'fp32'}"]
    (spec,) = load_runs(REPO / "experiments" / "notebook_1_12a.yaml", overrides)
    run(spec.experiment, tmp_path / "run", progress=False)
    ours, theirs = load_recording(tmp_path / "run" / RECORDING), load_recording(loop)
    for name in ("W", "grads", "momentum", "variance", "logits"):
        assert torch.equal(ours[name], theirs[name]), name
    assert torch.equal(ours["loss"][1:], theirs["loss"][1:])
    assert theirs["loss"][0] == 0 and ours["loss"][0] > 0  # the notebook never wrote loss[0]; ours is the dummy's


def test_targets_change_the_objective(make_experiment, tmp_path):
    """Each key alone changes what is computed; the grid over the targets is a valid experiment."""
    base = run(make_experiment(train={"steps": 3}), tmp_path / "a", progress=False)
    after_next = run(make_experiment(train={"steps": 3, "targets": "token-after-next"}), tmp_path / "b",
                     progress=False)
    assert base["run_id"] != after_next["run_id"]
    a, b = load_recording(tmp_path / "a" / RECORDING), load_recording(tmp_path / "b" / RECORDING)
    assert torch.equal(a["W"][0], b["W"][0]) and not torch.equal(a["loss"], b["loss"])
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"include: {REPO / 'experiments' / 'smoke.yaml'}\nname: objectives\n"
                    "grid: {train.targets: [next-token, token-after-next]}\n")
    assert len({r.run_id for r in load_runs(grid)}) == 2
