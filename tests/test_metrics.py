"""Dead-token analysis on hand-built matrices with known norms and cosines."""

import pytest
import torch

from runner.metrics import dead_token_summary


def test_dead_token_summary_on_known_rows():
    # tokens 0 and 2 never occur; their rows have norms 5 and 2 and cosine 8 / (5 * 2) = 0.8
    W = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, 3.0]], dtype=torch.bfloat16)
    summary = dead_token_summary(W, [0, 5, 0, 3])
    assert summary["dead_tokens"] == 2
    assert summary["dead_row_norm"] == pytest.approx(3.5)
    assert summary["live_row_norm"] == pytest.approx(2.0)
    assert summary["dead_cosine"] == pytest.approx(0.8)


def test_dead_token_summary_edge_cases():
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    one_dead = dead_token_summary(W, [0, 1, 1])
    assert one_dead["dead_tokens"] == 1 and one_dead["dead_row_norm"] == pytest.approx(1.0)
    assert one_dead["dead_cosine"] is None  # no pair to compare
    none_dead = dead_token_summary(W, [1, 1, 1])
    assert none_dead == {"dead_tokens": 0, "dead_row_norm": None, "live_row_norm": pytest.approx(5 / 3),
                         "dead_cosine": None}
    opposite = dead_token_summary(torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 1.0]]), [0, 0, 1])
    assert opposite["dead_cosine"] == pytest.approx(-1.0)
