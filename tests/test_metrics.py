"""Dead-token analysis on hand-built matrices with known norms and cosines."""

import json

import numpy as np
import pytest
import torch

from runner.analysis.metrics import compute_metrics, dead_row_norms, dead_token_summary, load_metrics
from runner.layout import RECORDING
from runner.recording.rows import RowReader

from conftest import load_recording

METRIC_COLUMNS = ["step", "loss", "lr", "dead_norm", "live_norm", "dead_norm_min", "dead_norm_max", "dead_cosine",
                  "dead_live_cosine", "dead_drift", "live_drift", "dead_grad_norm", "live_grad_norm", "dead_update",
                  "live_update", "dead_logit", "live_logit", "dead_logit_max"]


def test_dead_token_summary_on_known_rows():
    # tokens 0 and 2 never occur; their rows have norms 5 and 2 and cosine 8 / (5 * 2) = 0.8
    W = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, 3.0]], dtype=torch.bfloat16)
    summary = dead_token_summary(W.float().numpy(), [0, 5, 0, 3])
    assert summary["dead_tokens"] == 2
    assert summary["dead_row_norm"] == pytest.approx(3.5)
    assert summary["live_row_norm"] == pytest.approx(2.0)
    assert summary["dead_cosine"] == pytest.approx(0.8)


def test_dead_token_summary_edge_cases():
    W = np.array([[1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    one_dead = dead_token_summary(W, [0, 1, 1])
    assert one_dead["dead_tokens"] == 1 and one_dead["dead_row_norm"] == pytest.approx(1.0)
    assert one_dead["dead_cosine"] is None  # no pair to compare
    none_dead = dead_token_summary(W, [1, 1, 1])
    assert none_dead == {"dead_tokens": 0, "dead_row_norm": None, "live_row_norm": pytest.approx(5 / 3),
                         "dead_cosine": None}
    opposite = dead_token_summary(np.array([[1.0, 0.0], [-2.0, 0.0], [0.0, 1.0]]), [0, 0, 1])
    assert opposite["dead_cosine"] == pytest.approx(-1.0)


# --- per-step metrics on a synthetic recording written by the project's own writer ---

B1, B2, EPS = 0.9, 0.999, 1e-8
DEAD = (0, 1, 2)  # tokens 0-2 never occur; their rows point along +x, +y and -x


def synthetic_values(step: int) -> dict[str, torch.Tensor]:
    """Step s >= 1: dead rows of norm s, live rows (1, 1); gradients 2^-10 (dead) and 5 (live);
    Adam moments of t = s - 1 updates whose bias-corrected update is a / (a + eps) along x, with
    a = 1e-6 for dead rows and 1 for live ones; logits -s, -2s, -3s (dead) and s (live)."""
    W = torch.ones(128, 2)
    W[list(DEAD)] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]) * step
    grads = torch.tensor([3.0, 4.0]).repeat(128, 1)
    grads[list(DEAD)] = torch.tensor([2.0 ** -10, 0.0])
    a = torch.ones(128)
    a[list(DEAD)] = 1e-6
    t = step - 1
    momentum, variance = torch.zeros(128, 2), torch.zeros(128, 2)
    if t > 0:
        momentum[:, 0], variance[:, 0] = (1 - B1 ** t) * a, (1 - B2 ** t) * a * a
    logits = torch.full((128,), float(step))
    logits[list(DEAD)] = torch.tensor([-1.0, -2.0, -3.0]) * step
    return {"W": W, "grads": grads, "momentum": momentum, "variance": variance, "logits": logits,
            "loss": torch.tensor(float(step))}


def write_synthetic(path, steps=4, **record):
    from runner.config import build_experiment
    from runner.recording.writer import RecordingWriter

    exp = build_experiment({"name": "synthetic", "model": {"hidden_dim": 2},
                            "train": {"steps": steps, "betas": [B1, B2], "eps": EPS}, "record": record})
    counts = [0 if i in DEAD else 1 for i in range(128)]
    writer = RecordingWriter(path, exp, metadata={"config": json.dumps(exp.to_dict()),
                                                  "token_counts": json.dumps(counts)}, device=torch.device("cpu"))
    for step in range(1, steps + 1):
        writer.record(step, synthetic_values(step))
    last = synthetic_values(steps)
    writer.close({"W_final": last["W"], "momentum_final": last["momentum"], "variance_final": last["variance"]}, {})
    return exp


def test_metrics_of_a_synthetic_recording(tmp_path):
    write_synthetic(tmp_path / "rec.safetensors")
    table = compute_metrics(tmp_path / "rec.safetensors")
    assert list(table.columns) == METRIC_COLUMNS
    assert table["step"].tolist() == [0, 1, 2, 3, 4]
    scale = [1, 1, 2, 3, 4]  # row 0 holds step 1's W, logits and loss (zero gradient and moments)
    assert table["loss"].tolist() == scale
    assert table["dead_norm"].tolist() == pytest.approx(scale)
    assert table["dead_norm_min"].tolist() == pytest.approx(scale)
    assert table["dead_norm_max"].tolist() == pytest.approx(scale)
    assert table["live_norm"].tolist() == pytest.approx([2 ** 0.5] * 5)
    assert table["dead_cosine"].tolist() == pytest.approx([-1 / 3] * 5)  # pairs: 0, 0, -1 (each twice)
    assert table["dead_live_cosine"].tolist() == pytest.approx([2 ** -0.5] * 5)  # mean dead row (0, s/3)
    assert table["dead_drift"].tolist() == pytest.approx([0, 0, 1, 2, 3])
    assert table["live_drift"].tolist() == pytest.approx([0] * 5)
    assert table["dead_grad_norm"].tolist() == pytest.approx([0] + [2 ** -10] * 4)
    assert table["live_grad_norm"].tolist() == pytest.approx([0] + [5] * 4)
    assert table[["dead_update", "live_update"]].iloc[:2].isna().all().all()  # no update before row 2
    assert table["dead_update"].iloc[2:].tolist() == pytest.approx([1e-6 / (1e-6 + EPS)] * 3, rel=1e-5)
    assert table["live_update"].iloc[2:].tolist() == pytest.approx([1 / (1 + EPS)] * 3, rel=1e-5)
    assert table["dead_logit"].tolist() == pytest.approx([-2 * s for s in scale])
    assert table["dead_logit_max"].tolist() == pytest.approx([-s for s in scale])
    assert table["live_logit"].tolist() == pytest.approx(scale)


def test_metrics_with_a_stride_and_absent_tensors(tmp_path):
    write_synthetic(tmp_path / "rec.safetensors", steps=8, every=4, tensors=["W", "loss"])
    table = compute_metrics(tmp_path / "rec.safetensors", chunk_rows=2)  # chunks of 2 rows: 3 rows, 2 chunks
    assert table["step"].tolist() == [0, 4, 8]
    assert table["dead_norm"].tolist() == pytest.approx([1, 4, 8])
    assert set(table.columns) == {"step", "loss", "lr", "dead_norm", "live_norm", "dead_norm_min", "dead_norm_max",
                                  "dead_cosine", "dead_live_cosine", "dead_drift", "live_drift"}


def test_metrics_are_cached_and_recomputed_when_the_recording_changes(tmp_path):
    write_synthetic(tmp_path / RECORDING)
    first = load_metrics(tmp_path)
    stored = (tmp_path / "metrics.csv").stat().st_mtime_ns
    assert load_metrics(tmp_path).equals(first)  # from the cache, to the bit
    assert (tmp_path / "metrics.csv").stat().st_mtime_ns == stored
    write_synthetic(tmp_path / RECORDING, steps=6)  # a new recording at the same path
    again = load_metrics(tmp_path)
    assert again["step"].tolist() == list(range(7)) and len(first) == 5


def test_dead_row_norms_per_token(tmp_path):
    write_synthetic(tmp_path / "rec.safetensors")
    norms = dead_row_norms(tmp_path / "rec.safetensors", chunk_rows=2)
    assert list(norms.columns) == ["step", "\\x00", "\\x01", "\\x02"]
    assert norms["\\x02"].tolist() == pytest.approx([1, 1, 2, 3, 4])


def test_row_reader_matches_safetensors(tmp_path):
    write_synthetic(tmp_path / "rec.safetensors")
    whole = load_recording(tmp_path / "rec.safetensors")
    with RowReader(tmp_path / "rec.safetensors") as f:
        assert json.loads(f.metadata["token_counts"])[:4] == [0, 0, 0, 1]
        for name in ("W", "grads", "momentum", "logits", "loss"):  # bf16 and fp32, 1 to 3 dimensions
            assert np.array_equal(f.rows(name, 1, 4), whole[name][1:4].float().numpy()), name
        with pytest.raises(KeyError):
            f.rows("nothing", 0, 1)
