"""Model snapshots: the schedule, loading them with transformers, resume."""

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast, pipeline

from runner.launch.train import run
from runner.layout import RECORDING
from runner.training.snapshots import snapshot_dir, snapshot_steps

from conftest import load_recording

PYTHIA_12 = ["step-0", "step-1", "step-2", "step-4", "step-8", "step-12"]


def test_schedules():
    assert snapshot_steps("pythia", 1000) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert snapshot_steps("pythia", 2500) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 2500]
    assert snapshot_steps("pythia", 3) == [0, 1, 2, 3]
    assert snapshot_steps("final", 40) == [40] and snapshot_steps("none", 40) == []
    assert snapshot_steps((30, 0, 7), 40) == [0, 7, 30]


@pytest.fixture(scope="module")
def pythia_run(tmp_path_factory, small_book):
    from runner.config import build_experiment
    exp = build_experiment({"name": "snap", "corpus": {"path": str(small_book)}, "record": {"model_steps": "pythia"},
                            "train": {"steps": 12, "batch_size": 4, "device": "cpu", "checkpoint_every": 5}})
    run_dir = tmp_path_factory.mktemp("pythia")
    manifest = run(exp, run_dir, progress=False)
    return exp, run_dir, manifest


def test_snapshots_load_generate_and_match_the_recording(pythia_run):
    exp, run_dir, manifest = pythia_run
    assert manifest["snapshots"] == PYTHIA_12
    assert sorted(p.name for p in (run_dir / "models").iterdir()) == sorted(PYTHIA_12)
    recording = load_recording(run_dir / RECORDING, ("W", "W_final"))
    final = GPT2LMHeadModel.from_pretrained(snapshot_dir(run_dir, 12))
    assert torch.equal(final.lm_head.weight, final.transformer.wte.weight)  # still tied
    assert torch.equal(final.lm_head.weight.detach().to(torch.bfloat16), recording["W_final"])
    initial = GPT2LMHeadModel.from_pretrained(snapshot_dir(run_dir, 0))
    assert torch.equal(initial.lm_head.weight.detach().to(torch.bfloat16), recording["W"][0])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(snapshot_dir(run_dir, 12))
    generate = pipeline("text-generation", model=final, tokenizer=tokenizer, device="cpu")
    text = generate("Gatsby", max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert text.startswith("Gatsby") and len(text) == len("Gatsby") + 10
    # without a length: as many tokens as the model has positions (the prompt's 6 characters included)
    text = generate("Gatsby", do_sample=False)[0]["generated_text"]
    assert text.startswith("Gatsby") and len(text) == exp.model.n_positions


def test_default_is_the_final_snapshot_only(make_experiment, tmp_path):
    manifest = run(make_experiment(train={"steps": 3}), tmp_path, progress=False)
    assert manifest["snapshots"] == ["step-3"] and [p.name for p in (tmp_path / "models").iterdir()] == ["step-3"]


def test_a_resumed_run_ends_with_the_same_snapshots(pythia_run, tmp_path, crash_after_checkpoint):
    exp, uninterrupted, _ = pythia_run
    crash_after_checkpoint(exp, tmp_path)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["step-0", "step-1", "step-2", "step-4"]
    (tmp_path / "models" / "step-8.partial").mkdir()  # as a crash in the middle of a snapshot leaves it
    manifest = run(exp, tmp_path, progress=False)
    assert manifest["resumed_from_step"] == 5 and manifest["snapshots"] == PYTHIA_12
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(PYTHIA_12)
    for name in PYTHIA_12:
        a = (uninterrupted / "models" / name / "model.safetensors").read_bytes()
        assert a == (tmp_path / "models" / name / "model.safetensors").read_bytes(), name
