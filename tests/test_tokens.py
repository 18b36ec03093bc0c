"""Per-token tools of the public API: a run's dead and live tokens, each token's row at every step."""

import json

import numpy as np
import pytest

from runner import load_index, token_ids, token_rows
from runner.launch.train import run
from runner.layout import RECORDING
from runner.runs.index import rebuild_index

from conftest import load_recording


@pytest.fixture(scope="module")
def two_formats(tmp_path_factory, small_book):
    """The same short run recorded full and compact."""
    from runner.config import build_experiment

    dirs = {}
    for fmt in ("full", "compact"):
        exp = build_experiment({"name": "tok", "corpus": {"path": str(small_book)}, "record": {"format": fmt},
                                "train": {"steps": 20, "batch_size": 4, "device": "cpu"}})
        dirs[fmt] = tmp_path_factory.mktemp(fmt) / "tok" / exp.run_id
        run(exp, dirs[fmt], progress=False)
    return dirs


def test_token_ids_are_the_books_dead_and_live_tokens(two_formats):
    ids = token_ids(two_formats["full"])
    manifest = json.loads((two_formats["full"] / "run.json").read_text())
    counts = manifest["corpus"]["token_counts"]
    assert ids["dead"] == [i for i, c in enumerate(counts) if c == 0] == manifest["corpus"]["dead_tokens"]
    assert ids["live"] == [i for i, c in enumerate(counts) if c] and len(ids["dead"]) > 2
    rebuild_index(two_formats["full"].parent)
    assert load_index(two_formats["full"].parent)["dead_token_ids"][0] == ids["dead"]


def test_token_rows_are_each_rows_norm_and_cosines(two_formats):
    table = token_rows(two_formats["full"])
    W = load_recording(two_formats["full"] / RECORDING, ("W",))["W"].float().numpy()
    dead = token_ids(two_formats["full"])["dead"]
    assert len(table) == 21 * len(dead) and table.dead.all()
    last = table[table.step == 20].set_index("token")
    assert np.allclose(last.norm.loc[dead], np.linalg.norm(W[20, dead], axis=1), rtol=1e-6)
    assert np.allclose(table[table.step == 0].cosine_initial, 1, atol=1e-6)
    mean = W[20, dead].mean(axis=0)
    expected = W[20, dead] @ mean / (np.linalg.norm(W[20, dead], axis=1) * np.linalg.norm(mean))
    assert np.allclose(last.cosine_dead_mean.loc[dead], expected, atol=1e-5)
    assert last.char.loc[dead[0]] == repr(chr(dead[0]))[1:-1]


def test_token_rows_read_either_format_alike_and_choose_tokens_steps_tensors(two_formats):
    a = token_rows(two_formats["full"], tokens=[10, 3, 60], tensor="momentum", steps=[0, 5, 19])
    b = token_rows(two_formats["compact"], tokens=[10, 3, 60], tensor="momentum", steps=[0, 5, 19])
    assert a.equals(b) and a.step.tolist() == [0] * 3 + [5] * 3 + [19] * 3 and a.token.tolist()[:3] == [10, 3, 60]
    with pytest.raises(ValueError, match="'E': not a per-step matrix of this recording"):
        token_rows(two_formats["full"], tensor="E")
