import dataclasses
import math
import subprocess
from pathlib import Path

import pytest

from runner.config import NOT_IDENTITY, build_experiment, identity, introduced_with, load_runs
from runner.config.loading import experiment_data
from runner.errors import ConfigError

from conftest import REPO


def shipped_experiments() -> list[Path]:
    """The experiment files the repository holds (git's list: a file a user saved beside them, as
    the README's "grow a sweep" suggests, is not one), or every one outside a git checkout."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "experiments/*.yaml"], capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return sorted(REPO / name for name in listed.stdout.split())
    return sorted((REPO / "experiments").glob("*.yaml"))


EXPERIMENTS = shipped_experiments()


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiments_validate(path):
    """Every shipped file expands to one run per grid point, and each run's config round-trips."""
    runs = load_runs(path)
    grid = experiment_data(path).get("grid") or {}  # with its includes' (a grid may come from one)
    sizes = [len(range(*v["range"])) if isinstance(v, dict) else len(v) for v in grid.values()]
    assert len(runs) == math.prod(sizes) and len({r.run_id for r in runs}) == len(runs)
    for r in runs:
        assert build_experiment(r.experiment.to_dict()) == r.experiment
        assert set(r.point) == set(grid) and r.overrides == r.point


# Golden run ids: runs trained before a change are still found complete after it. A change here
# orphans every existing run directory of these experiments; add keys with `introduced_with`.
GOLDEN_RUN_IDS = {"lil_gatsby.yaml": "3959ef7929cb", "smoke.yaml": "30509a8442aa"}


@pytest.mark.parametrize("name, run_id", GOLDEN_RUN_IDS.items())
def test_run_ids_of_shipped_experiments_are_pinned(name, run_id):
    (run,) = load_runs(REPO / "experiments" / name)
    assert run.run_id == run_id


def test_identity_follows_field_metadata():
    @dataclasses.dataclass(frozen=True)
    class Inner:
        kept: int = 1
        where: str = dataclasses.field(default="here", metadata=NOT_IDENTITY)
        added: str = dataclasses.field(default="old", metadata=introduced_with("old"))

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)
        label: str = "x"

    assert identity(Outer()) == {"inner": {"kept": 1}, "label": "x"}
    assert identity(Outer(Inner(where="there"))) == identity(Outer())
    assert identity(Outer(Inner(added="new"))) == {"inner": {"kept": 1, "added": "new"}, "label": "x"}


def test_reference_experiment_is_the_notebook():
    (run,) = load_runs(REPO / "experiments" / "lil_gatsby.yaml")
    e = run.experiment
    assert (e.model.vocab_size, e.model.context_length, e.model.hidden_dim, e.model.n_layers, e.model.n_heads) \
        == (128, 128, 64, 2, 2)
    assert (e.train.steps, e.train.batch_size, e.train.lr, e.train.seed, e.train.precision) \
        == (10_000, 32, 1e-3, 42, "bf16-true")
    assert e.record.every == 1 and len(e.record.tensors) == 6


def test_defaults_are_the_reference():
    (run,) = load_runs(REPO / "experiments" / "lil_gatsby.yaml")
    assert run.experiment == build_experiment({"name": "lil_gatsby"})


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "name: x\n")
    (run,) = load_runs(path, ["train.steps=40", "train.betas=[0.8, 0.9]", "train.threads=null"])
    assert run.experiment.train.steps == 40 and run.experiment.train.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match=r"^--set train.steps: must be between 1"):
        load_runs(path, ["train.steps=0"])
    with pytest.raises(ConfigError, match=r"--set 'steps': expected key=value"):
        load_runs(path, ["steps"])


@pytest.mark.parametrize("bad_set, message", [
    ("train.step=3", "--set train.step=3: train.step: unknown key (known: steps, batch_size,"),
    ("trian.steps=3", "--set trian.steps=3: trian: unknown key (known: name, corpus,"),
    ("train.step=[1, 2]", "--set train.step=[1, 2]: train.step: unknown key"),
    ("train.lr=fast", "--set train.lr: must be a finite number (got 'fast')"),
])
def test_a_bad_set_is_blamed_on_set_not_on_the_file(tmp_path, bad_set, message):
    path = write(tmp_path, "name: x\ngrid: {train.seed: [1, 2]}\n")
    with pytest.raises(ConfigError) as e:
        load_runs(path, [bad_set])
    assert str(e.value).startswith(message) and str(path) not in str(e.value)


def test_floats_as_people_write_them(tmp_path):
    """YAML 1.1 reads 3e-4 as a string; experiment files and --set read it as a number."""
    path = write(tmp_path, "name: x\ntrain: {lr: 3e-4, eps: 1E-8}\ngrid: {train.betas: [[0.9, 0.999], [0.9, 1e-1]]}\n")
    runs = load_runs(path)
    assert [(r.experiment.train.lr, r.experiment.train.eps, r.experiment.train.betas) for r in runs] == [
        (3e-4, 1e-8, (0.9, 0.999)), (3e-4, 1e-8, (0.9, 0.1))]
    (run,) = load_runs(write(tmp_path, "name: x\n"), ["train.lr=2.5e-3"])
    assert run.experiment.train.lr == 0.0025
    lrs = [r.experiment.train.lr for r in load_runs(write(tmp_path, "name: x\ngrid: {train.lr: [1e-3, 3e-3]}\n"))]
    assert lrs == [0.001, 0.003]
    with pytest.raises(ConfigError, match=r"train.steps: must be an integer \(got 1000.0\)"):
        load_runs(path, ["train.steps=1e3"])


def test_set_replaces_or_adds_a_grid_axis(tmp_path):
    path = write(tmp_path, "name: g\ngrid: {train.seed: [5, 6], train.precision: [bf16-true, fp32]}\n")
    seeds = lambda runs: sorted({r.experiment.train.seed for r in runs})  # noqa: E731
    assert seeds(load_runs(path, ["train.seed=[0,1,2]"])) == [0, 1, 2]
    assert seeds(load_runs(path, ["train.seed={range: [0, 3]}"])) == [0, 1, 2]
    runs = load_runs(path, ["train.seed=7"])  # a single value fixes the key: no axis
    assert seeds(runs) == [7] and [r.point for r in runs] == [{"train.precision": "bf16-true"},
                                                              {"train.precision": "fp32"}]
    assert runs[0].overrides == {"train.seed": 7, "train.precision": "bf16-true"} and runs[0].settings == {
        "train.seed": 7}
    runs = load_runs(path, ["train.lr=[0.1, 0.2]"])  # a key not on the grid becomes an axis, in grid order
    assert len(runs) == 8 and list(runs[0].point) == ["train.seed", "train.precision", "train.lr"]
    # a key whose value is a list: a list is its value, a list of lists an axis
    assert {r.experiment.train.betas for r in load_runs(path, ["train.betas=[0.8, 0.9]"])} == {(0.8, 0.9)}
    assert {r.experiment.record.tensors for r in load_runs(path, ["record.tensors=[]"])} == {()}  # a value
    runs = load_runs(path, ["train.betas=[[0.8, 0.9], [0.9, 0.95]]"])
    assert {r.experiment.train.betas for r in runs} == {(0.8, 0.9), (0.9, 0.95)} and len(runs) == 8


@pytest.mark.parametrize("yaml_text, message", [
    ("name: x\ntrain: {stpes: 3}\n", "train.stpes: unknown key"),
    ("name: x\nbogus: 1\n", "bogus: unknown key"),
    ("train: {steps: 3}\n", "name: required key is missing"),
    ("name: x\ntrain: {steps: ten}\n", "train.steps: must be an integer (got 'ten')"),
    ("name: x\ntrain: {steps: true}\n", "train.steps: must be an integer (got True)"),
    ("name: x\ntrain: {lr: .nan}\n", "train.lr: must be a finite number"),
    ("name: x\ntrain: {steps: 0}\n", "train.steps: must be between 1 and 10,000,000 (got 0)"),
    ("name: x\ntrain: {steps: 100000000000}\n", "train.steps: must be between 1"),
    ("name: x\ntrain: {batch_size: -1}\n", "train.batch_size: must be between 1"),
    ("name: x\ntrain: {lr: -0.1}\n", "train.lr: must be > 0"),
    ("name: x\ntrain: {betas: [0.9]}\n", "train.betas: must be a list of 2 values"),
    ("name: x\ntrain: {betas: [0.9, 1.0]}\n", "train.betas: must both be in [0, 1)"),
    ("name: x\ntrain: {eps: 0}\n", "train.eps: must be > 0"),
    ("name: x\ntrain: {seed: -1}\n", "train.seed: must be between 0"),
    ("name: x\ntrain: {precision: fp16}\n", "train.precision: must be one of ['bf16-true', 'bf16-mixed', 'fp32']"),
    ("name: x\ntrain: {device: tpu}\n", "train.device: must be one of"),
    ("name: x\ntrain: {threads: 0}\n", "train.threads: must be null or between 1"),
    ("name: x\ntrain: {weight_decay: 0.1}\n", "train.weight_decay: must be 0 with train.optimizer adam"),
    ("name: x\ntrain: {optimizer: adamw, weight_decay: 2}\n", "train.weight_decay: must be between 0 and 1"),
    ("name: x\ntrain: {optimizer: sgd}\n", "train.optimizer: must be one of ['adam', 'adamw']"),
    ("name: x\ntrain: {lr_schedule: linear}\n", "train.lr_schedule: must be one of ['constant', 'cosine']"),
    ("name: x\ntrain: {steps: 10, warmup_steps: 11}\n", "train.warmup_steps: must be between 0 and train.steps"),
    ("name: x\ntrain: {min_lr: 1.0e-4}\n", "train.min_lr: must be 0 with train.lr_schedule constant"),
    ("name: x\ntrain: {lr_schedule: cosine, min_lr: 0.1}\n", "train.min_lr: must be between 0 and train.lr"),
    ("name: x\ntrain: {grad_clip: 0}\n", "train.grad_clip: must be null or > 0"),
    ("name: x\nmodel: {tie_embeddings: 1}\n", "model.tie_embeddings: must be true or false (got 1)"),
    ("name: x\nmodel: {vocab_size: 256}\n", "model.vocab_size: must be 128: the tokenizer is ASCII-128 (got 256)"),
    ("name: x\nmodel: {context_length: 256}\n", "model.context_length: must be between 1 and model.n_positions"),
    ("name: x\nmodel: {hidden_dim: 65}\n", "model.hidden_dim: must be a positive multiple of model.n_heads"),
    ("name: x\nmodel: {n_layers: 0}\n", "model.n_layers: must be between 1"),
    ("name: x\nmodel: {n_heads: 0}\n", "model.n_heads: must be between 1"),
    ("name: x\nmodel: {n_positions: 0}\n", "model.n_positions: must be between 1"),
    ("name: x\nrecord: {every: 0}\n", "record.every: must be between 1 and train.steps"),
    ("name: x\nrecord: {tensors: [W, Q]}\n", "record.tensors: must be distinct names"),
    ("name: x\ncorpus: {ascii: keep}\n", "corpus.ascii: must be one of ['drop', 'map']"),
    ("name: x\ncorpus: {path: 3}\n", "corpus.path: must be a string"),
    ("name: x\nresources: {cpus_per_run: 0}\n", "resources.cpus_per_run: must be > 0"),
    ("name: x\nresources: {gpus_per_run: -1}\n", "resources.gpus_per_run: must be between 0"),
    ("name: ../../x\n", "name: must be 1-100 characters"),
    ("name: /abs/path\n", "name: must be 1-100 characters"),
    ("name: x\ntrain: [1, 2]\n", "train: must be a mapping"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("name: x\ntrain: {steps: 3\n", "invalid YAML at line"),
    ("name: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
])
def test_validation_errors_name_file_key_and_value(tmp_path, yaml_text, message):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as e:
        load_runs(path)
    text = str(e.value)
    assert message in text and str(path) in text and "\n" not in text


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such experiment file"):
        load_runs(tmp_path / "nope.yaml")


def test_run_id_is_stable_and_sensitive():
    a = build_experiment({"name": "x"})
    assert a.run_id == build_experiment({"name": "x", "train": {"seed": 42}}).run_id
    assert len(a.run_id) == 12
    assert a.run_id != build_experiment({"name": "x", "train": {"seed": 43}}).run_id
    assert a.run_id != build_experiment({"name": "x", "train": {"lr": 2e-3}}).run_id
    # where the book is and what a run asks Ray for do not change what it computes
    assert a.run_id == build_experiment({"name": "x", "corpus": {"path": "/elsewhere.txt"},
                                         "resources": {"cpus_per_run": 2}}).run_id


def test_grid_is_the_cartesian_product(tmp_path):
    path = write(tmp_path, "name: g\ngrid:\n  train.seed: {range: [0, 3]}\n  train.precision: [bf16-true, fp32]\n")
    runs = load_runs(path)
    assert [(r.experiment.train.seed, r.experiment.train.precision) for r in runs] == [
        (s, p) for s in range(3) for p in ("bf16-true", "fp32")]
    assert runs[1].point == {"train.seed": 0, "train.precision": "fp32"} and runs[1].label == (
        "train.seed=0 train.precision=fp32")
    assert len({r.run_id for r in runs}) == 6
    assert [r.run_id for r in runs] == [r.run_id for r in load_runs(path)]  # stable across loads


def test_range_with_step_and_set_overrides_a_grid_key(tmp_path):
    path = write(tmp_path, "name: g\ngrid: {train.seed: {range: [0, 10, 5]}, train.lr: [0.1, 0.2]}\n")
    assert [r.experiment.train.seed for r in load_runs(path)] == [0, 0, 5, 5]
    assert [r.point for r in load_runs(path, ["train.seed=7"])] == [{"train.lr": 0.1}, {"train.lr": 0.2}]


def test_include_is_a_base_deep_merged(tmp_path):
    write(tmp_path, "name: base\ntrain: {steps: 5, lr: 0.01}\ngrid: {train.seed: [1, 2]}\n", "base.yaml")
    path = write(tmp_path, "include: base.yaml\nname: child\ntrain: {steps: 7}\n")
    runs = load_runs(path)
    assert [(r.experiment.name, r.experiment.train.steps, r.experiment.train.lr, r.experiment.train.seed)
            for r in runs] == [("child", 7, 0.01, 1), ("child", 7, 0.01, 2)]


def test_include_cycle_and_missing(tmp_path):
    write(tmp_path, "include: b.yaml\nname: a\n", "a.yaml")
    write(tmp_path, "include: a.yaml\nname: b\n", "b.yaml")
    with pytest.raises(ConfigError, match="include: cycle"):
        load_runs(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="nope.yaml: no such experiment file"):
        load_runs(write(tmp_path, "include: nope.yaml\nname: x\n"))


@pytest.mark.parametrize("grid, message", [
    ("{train.lr: [0.1, -1]}", "train.lr: must be > 0 and <= 10 (got -1.0) (grid point train.lr=-1)"),
    ("{train.stpes: [1]}", "train.stpes: unknown key"),
    ("{train.seed: []}", "grid: has no runs (empty axis: train.seed)"),
    ("{train.seed: {range: [5, 5]}}", "grid: has no runs"),
    ("{train.seed: {range: [0, 1000]}, train.lr: {range: [1, 1001]}}", "grid: has 1,000,000 runs; the limit is 10,000"),
    ("{train.seed: {range: [a, b]}}", "grid.train.seed: range must be [start, stop]"),
    ("{train.seed: 3}", "grid.train.seed: must be a list of values"),
    ("{train.seed: [1, 1]}", "give the same run"),
    ("[1, 2]", "grid: must be a mapping"),
])
def test_grid_errors(tmp_path, grid, message):
    path = write(tmp_path, f"name: g\ngrid: {grid}\n")
    with pytest.raises(ConfigError) as e:
        load_runs(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_huge_grid_is_refused_without_expanding_it(tmp_path):
    path = write(tmp_path, "name: g\ngrid: {train.seed: {range: [0, 1000000000000]}}\n")
    with pytest.raises(ConfigError, match="has 1,000,000,000,000 runs"):
        load_runs(path)


def test_learning_rate_schedules():
    def lrs(**train):
        cfg = build_experiment({"name": "x", "train": {"steps": 10, "lr": 1.0, **train}}).train
        return [cfg.learning_rate(s) for s in range(1, 11)], cfg.lr_varies

    assert lrs() == ([1.0] * 10, False)
    assert lrs(warmup_steps=4) == ([0.25, 0.5, 0.75, 1.0] + [1.0] * 6, True)
    cosine, varies = lrs(lr_schedule="cosine", warmup_steps=2, min_lr=0.1)
    assert varies and cosine[:2] == [0.5, 1.0] and cosine[-1] == pytest.approx(0.1)
    assert cosine[5] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 4 / 8)) / 2)
    assert all(a > b for a, b in zip(cosine[1:], cosine[2:], strict=False))  # decreasing after the warm-up


def test_new_keys_at_their_defaults_keep_run_ids():
    """The optimizer keys and tie_embeddings join the identity only when set to something else."""
    base = build_experiment({"name": "x"})
    explicit = build_experiment({"name": "x", "model": {"tie_embeddings": True},
                                 "train": {"optimizer": "adam", "weight_decay": 0, "lr_schedule": "constant",
                                           "warmup_steps": 0, "min_lr": 0, "grad_clip": None}})
    assert explicit.run_id == base.run_id
    assert build_experiment({"name": "x", "train": {"grad_clip": 1.0}}).run_id != base.run_id
