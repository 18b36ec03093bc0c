"""How the report groups runs (a band averages seeds of one config only) and styles the groups."""


import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from runner.analysis.figures import _legible_log_ticks, group_styles, log_spaced
from runner.analysis.groups import RunEntry, full_config, group_runs, shared_config, varying_keys
from runner.config import build_experiment
from runner.runs.index import flatten_config


def entry(tmp_path=None, name="smoke", status="complete", **sections) -> RunEntry:
    exp = build_experiment({"name": name, **sections})
    return RunEntry(tmp_path, {"run_id": exp.run_id, "status": status, "name": name}, flatten_config(exp.to_dict()))


def test_runs_that_differ_in_the_seed_alone_are_one_group():
    runs = [entry(train={"seed": s}) for s in (3, 1, 2)]
    groups, keys = group_runs(runs, "smoke")
    assert keys == [] and len(groups) == 1
    assert groups[0].label == "smoke" and groups[0].seeds == [1, 2, 3]


def test_set_overrides_and_the_same_seed_are_two_groups():
    """The issue's case: smoke.yaml, then the same file with --set train.steps=20 --set
    train.precision=fp32; both seed 42. Two groups, each one run, labelled by what differs."""
    a = entry(train={"steps": 30, "batch_size": 8})
    b = entry(train={"steps": 20, "batch_size": 8, "precision": "fp32"})
    groups, keys = group_runs([a, b], "smoke")
    assert keys == ["train.steps", "train.precision"]
    assert [g.label for g in groups] == ["steps=20, precision=fp32", "steps=30, precision=bf16-true"]
    assert [g.seeds for g in groups] == [[42], [42]]
    shared = shared_config([a, b])
    assert "steps" not in shared["train"] and "precision" not in shared["train"]
    assert shared["train"]["batch_size"] == 8 and shared["model"]["hidden_dim"] == 64


def test_keys_that_do_not_change_results_do_not_split_groups():
    a = entry(train={"seed": 1})
    b = entry(train={"seed": 2, "checkpoint_every": 7}, corpus={"path": "/elsewhere/book.txt"},
              resources={"cpus_per_run": 2})
    groups, keys = group_runs([a, b], "smoke")
    assert keys == [] and groups[0].seeds == [1, 2]
    assert varying_keys([a, b]) == ([], ["corpus.path", "train.checkpoint_every", "resources.cpus_per_run"])


def test_a_run_moved_in_from_another_experiment_is_its_own_group():
    groups, keys = group_runs([entry(), entry(name="other")], "smoke")
    assert keys == ["name"] and [g.label for g in groups] == ["name=other", "name=smoke"]


def test_numeric_values_in_value_order_with_an_ordered_colour_map():
    runs = [entry(train={"lr": lr, "seed": s}) for lr in (0.01, 0.001, 0.003) for s in (0, 1)]
    groups, keys = group_runs(runs, "x")
    assert [g.label for g in groups] == ["lr=0.001", "lr=0.003", "lr=0.01"]
    styles = group_styles(groups, keys)
    viridis = matplotlib.colormaps["viridis"]
    assert [s.color for s in styles] == [matplotlib.colors.to_hex(viridis(x)) for x in np.linspace(0, 0.85, 3)]
    assert [s.width for s in styles] == sorted((s.width for s in styles), reverse=True)  # wide lines drawn first


def test_categories_get_distinct_colours_and_dashes_and_a_second_key_dashes():
    runs = [entry(train={"precision": p}) for p in ("fp32", "bf16-true")]
    styles = group_styles(*group_runs(runs, "x"))
    assert len({s.color for s in styles}) == 2 and len({s.dashes for s in styles}) == 2
    runs = [entry(train={"precision": p, "lr": lr}) for p in ("fp32", "bf16-true") for lr in (0.1, 0.2)]
    groups, keys = group_runs(runs, "x")
    styles = group_styles(groups, keys)
    by_label = {g.label: s for g, s in zip(groups, styles, strict=True)}
    assert by_label["lr=0.1, precision=fp32"].color == by_label["lr=0.1, precision=bf16-true"].color
    assert by_label["lr=0.1, precision=fp32"].dashes != by_label["lr=0.1, precision=bf16-true"].dashes
    assert by_label["lr=0.1, precision=fp32"].color != by_label["lr=0.2, precision=fp32"].color


def test_a_run_from_before_a_key_existed_groups_with_its_default(tmp_path):
    """A manifest written before `train.kernels` existed computed its default: same group."""
    new = entry(train={"seed": 1})
    config = build_experiment({"name": "smoke", "train": {"seed": 2}}).to_dict()
    del config["train"]["kernels"]
    old = RunEntry(tmp_path, {"run_id": "old", "status": "complete"}, full_config({"config": config}))
    groups, keys = group_runs([new, old], "smoke")
    assert keys == [] and groups[0].seeds == [1, 2]


@pytest.mark.parametrize("low, high, labels", [
    (6.0, 8.0, ["6", "7", "8"]),
    (0.02, 3.0, ["0.02", "0.05", "0.1", "0.2", "0.5", "1", "2"]),
    (1e-4, 10.0, ["0.0001", "0.001", "0.01", "0.1", "1", "10"]),
])
def test_log_axes_are_ticked_with_plain_numbers(low, high, labels):
    ax = Figure().add_subplot()
    ax.plot([1, 2], [low, high])
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    _legible_log_ticks(ax.yaxis, low, high)
    ax.figure.canvas.draw()
    shown = [t.get_text() for t in ax.get_yticklabels() if low <= t.get_position()[1] <= high and t.get_text()]
    assert shown == labels
    assert not [t.get_text() for t in ax.yaxis.get_minorticklabels() if t.get_text()]


def test_log_spaced_steps_keep_the_ends_and_the_early_steps():
    steps = np.arange(1, 10_001)
    picked = log_spaced(steps, 600)
    assert len(picked) <= 600 and picked[0] == 1 and picked[-1] == 10_000
    assert set(range(1, 60)) <= set(picked)  # every early step; the late ones thinned
    assert list(log_spaced(np.arange(1, 31), 600)) == list(range(1, 31))
