"""Experiment files: typed dataclasses, validated when loaded, expanded into runs.

One YAML format serves single runs and sweeps:

    name: lil_gatsby
    include: base.yaml            # optional: another experiment file used as base
    corpus: {...}  model: {...}  train: {...}  record: {...}  resources: {...}
    grid:                         # optional: dotted key -> list of values; runs = cartesian product
      train.seed: {range: [0, 8]}
      train.precision: [bf16-true, bf16-mixed]

Every error is a one-line `ConfigError` naming the file, the key and the value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from runner.errors import ConfigError

RECORDED_TENSORS = ("W", "grads", "momentum", "variance", "logits", "loss")
MAX_GRID_RUNS = 10_000
MAX_STEPS = 10_000_000


# Which fields make a run's identity (its run id), declared on the fields themselves:
# - NOT_IDENTITY: never part of it (where things are or how they are scheduled, not what is computed);
# - introduced_with(default): a key added after runs existed; part of the identity only when it holds
#   another value, so adding it leaves the run ids of every existing experiment unchanged.
NOT_IDENTITY = {"identity": False}


def introduced_with(default: Any) -> dict:
    return {"introduced_with": default}


def identity(config: Any) -> dict:
    """The fields of a config dataclass (recursively) that determine a run's results."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if not f.metadata.get("identity", True):
            continue
        if "introduced_with" in f.metadata and value == f.metadata["introduced_with"]:
            continue
        out[f.name] = identity(value) if is_dataclass(value) else value
    return out


@dataclass(frozen=True)
class CorpusConfig:
    # the book as a local file; None: $LILGATSBY_CORPUS, data/ cache, download. Where the book is,
    # not what it is (its sha256 is in the manifest).
    path: str | None = field(default=None, metadata=NOT_IDENTITY)
    ascii: Literal["drop", "map"] = "drop"  # how non-ASCII characters become 7-bit ASCII


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 128  # the ASCII tokenizer has exactly 128 tokens
    context_length: int = 128  # tokens per training window
    n_positions: int = 128  # GPT-2 position embeddings; >= context_length
    hidden_dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    # tie the input embedding to the unembedding (E = W, as in Qwen3-4B); false: E is its own
    # parameter, recorded beside W (docs/recording.md), the control for what the tie does
    tie_embeddings: bool = field(default=True, metadata=introduced_with(True))


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 32
    lr: float = 1.0e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0e-8
    seed: int = 42
    precision: Literal["bf16-true", "bf16-mixed", "fp32"] = "bf16-true"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int | None = None  # torch intra-op threads; None: all cores (or the CPUs Ray assigned)
    # steps between checkpoints (resume points after a crash, not results)
    checkpoint_every: int = field(default=1000, metadata=NOT_IDENTITY)
    # The notebook's 1.12a as it ran, one key per difference (experiments/notebook_1_12a.yaml sets all):
    # what is learned: next-token | token-after-next (already-shifted targets as labels=, shifted again by HF)
    targets: Literal["next-token", "token-after-next"] = field(
        default="next-token", metadata=introduced_with("next-token"))
    # which windows each step trains on: epochs (a permutation per epoch, the last partial batch dropped)
    # | notebook (its DataLoader's order, the last partial batch kept; row 0 from its dummy batch)
    batch_order: Literal["epochs", "notebook"] = field(default="epochs", metadata=introduced_with("epochs"))
    # fast (ours on the CPU, chosen per precision and device: runner/model/kernels.py, docs/speed.md)
    # | hf (transformers' own and torch's single-tensor Adam: the bits of recordings before round 2's
    # kernels) | notebook (HF's defaults: gelu_new, SDPA; the recorded mean logits reduced in the model's dtype)
    kernels: Literal["fast", "hf", "notebook"] = field(default="fast", metadata=introduced_with("fast"))
    # What large-model training runs with (docs/training.md, "Optimizer and schedule"):
    # adam | adamw: torch's AdamW, decay decoupled, on the 2-D matrices only (not biases, layer norms)
    optimizer: Literal["adam", "adamw"] = field(default="adam", metadata=introduced_with("adam"))
    weight_decay: float = field(default=0.0, metadata=introduced_with(0.0))  # adamw's; 0 with adam
    # constant | cosine (from lr down to min_lr at the last step), after `warmup_steps` of linear
    # warm-up from 0 (step s of the warm-up trains at lr * s / warmup_steps)
    lr_schedule: Literal["constant", "cosine"] = field(default="constant", metadata=introduced_with("constant"))
    warmup_steps: int = field(default=0, metadata=introduced_with(0))
    min_lr: float = field(default=0.0, metadata=introduced_with(0.0))
    # clip the global gradient norm (all parameters) to this before each update; null: no clipping
    grad_clip: float | None = field(default=None, metadata=introduced_with(None))

    @property
    def lr_varies(self) -> bool:
        """Whether the learning rate changes over the run (then each step's is recorded)."""
        return self.lr_schedule != "constant" or self.warmup_steps > 0

    def learning_rate(self, step: int) -> float:
        """The learning rate of update `step` (1..steps): lr * step / warmup_steps during the
        warm-up; then lr (constant) or min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2, p going from
        just above 0 after the warm-up to 1 at the last step (cosine). 0 at step 0: no update (as
        the recording's row 0 holds)."""
        if step == 0:
            return 0.0
        if step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr + (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2


@dataclass(frozen=True)
class RecordConfig:
    every: int = 1  # record steps 0, every, 2*every, ... <= steps
    tensors: tuple[str, ...] = RECORDED_TENSORS
    # whole-model snapshots (Hugging Face format) under models/step-<N>/: final | none | pythia | [steps]
    model_steps: Literal["final", "none", "pythia"] | tuple[int, ...] = field(
        default="final", metadata=introduced_with("final"))


@dataclass(frozen=True)
class ResourcesConfig:
    """What one run asks Ray for: scheduling only, so not part of the run id."""

    cpus_per_run: float = 1.0
    gpus_per_run: float = 1.0  # used only when the cluster has GPUs; fractions share a GPU


@dataclass(frozen=True)
class Experiment:
    name: str
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig, metadata=NOT_IDENTITY)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def run_id(self) -> str:
        """Short stable hash of the fields that determine the run's results (see `identity`)."""
        blob = json.dumps(identity(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def non_identity_keys(cls: Any = Experiment, prefix: str = "") -> set[str]:
    """The dotted keys that never change what a run computes (marked NOT_IDENTITY, or in a section
    that is), e.g. corpus.path, resources.cpus_per_run."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        inner = hints[f.name]
        if not f.metadata.get("identity", True):
            names = [g.name for g in fields(inner)] if is_dataclass(inner) else None
            keys |= {f"{prefix}{f.name}.{n}" for n in names} if names else {f"{prefix}{f.name}"}
        elif is_dataclass(inner):
            keys |= non_identity_keys(inner, f"{prefix}{f.name}.")
    return keys


@dataclass(frozen=True)
class Run:
    """One point of an experiment's grid: the resolved config, the grid values that made it and the
    `--set` values applied to every point."""

    experiment: Experiment
    point: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.experiment.run_id

    @property
    def label(self) -> str:
        """The grid point as people read it: `train.seed=1 train.precision=fp32`."""
        return point_label(self.point) or "(base config)"

    @property
    def overrides(self) -> dict[str, Any]:
        """Every key this run sets on top of its experiment file: `--set` values, then the grid point."""
        return {**self.settings, **self.point}


def point_label(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


# --- value checks beyond types: (dotted key, predicate(value, experiment), requirement) ---
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_RULES: list[tuple[str, typing.Callable[[Any, Experiment], bool], str]] = [
    ("name", lambda v, e: bool(_NAME_RE.fullmatch(v)) and ".." not in v,
     "must be 1-100 characters of letters, digits, '_', '.', '-' (it names a directory)"),
    ("model.vocab_size", lambda v, e: v == 128, "must be 128: the tokenizer is ASCII-128"),
    ("model.n_positions", lambda v, e: 1 <= v <= 65536, "must be between 1 and 65536"),
    ("model.context_length", lambda v, e: 1 <= v <= e.model.n_positions,
     "must be between 1 and model.n_positions"),
    ("model.n_heads", lambda v, e: 1 <= v <= 1024, "must be between 1 and 1024"),
    ("model.hidden_dim", lambda v, e: 1 <= v <= 65536 and v % e.model.n_heads == 0,
     "must be a positive multiple of model.n_heads"),
    ("model.n_layers", lambda v, e: 1 <= v <= 1024, "must be between 1 and 1024"),
    ("train.steps", lambda v, e: 1 <= v <= MAX_STEPS, f"must be between 1 and {MAX_STEPS:,}"),
    ("train.batch_size", lambda v, e: 1 <= v <= 65536, "must be between 1 and 65536"),
    ("train.lr", lambda v, e: 0 < v <= 10, "must be > 0 and <= 10"),
    ("train.betas", lambda v, e: all(0 <= b < 1 for b in v), "must both be in [0, 1)"),
    ("train.eps", lambda v, e: 0 < v <= 1, "must be > 0 and <= 1"),
    ("train.seed", lambda v, e: 0 <= v < 2**63, "must be between 0 and 2**63 - 1"),
    ("train.threads", lambda v, e: v is None or 1 <= v <= 1024, "must be null or between 1 and 1024"),
    ("train.weight_decay", lambda v, e: 0 <= v <= 1, "must be between 0 and 1"),
    ("train.weight_decay", lambda v, e: v == 0 or e.train.optimizer == "adamw",
     "must be 0 with train.optimizer adam (torch's Adam would add it to the gradient as an L2 penalty, "
     "not decay the weights; use adamw)"),
    ("train.warmup_steps", lambda v, e: 0 <= v <= e.train.steps, "must be between 0 and train.steps"),
    ("train.min_lr", lambda v, e: 0 <= v <= e.train.lr, "must be between 0 and train.lr"),
    ("train.min_lr", lambda v, e: v == 0 or e.train.lr_schedule == "cosine",
     "must be 0 with train.lr_schedule constant (it is where cosine ends)"),
    ("train.grad_clip", lambda v, e: v is None or 0 < v <= 1e6, "must be null or > 0"),
    ("train.checkpoint_every", lambda v, e: 1 <= v <= MAX_STEPS, f"must be between 1 and {MAX_STEPS:,}"),
    ("record.every", lambda v, e: 1 <= v <= e.train.steps, "must be between 1 and train.steps"),
    ("record.tensors", lambda v, e: set(v) <= set(RECORDED_TENSORS) and len(set(v)) == len(v),
     f"must be distinct names from {list(RECORDED_TENSORS)}"),
    ("record.model_steps", lambda v, e: isinstance(v, str) or (len(set(v)) == len(v)
                                                                and all(0 <= s <= e.train.steps for s in v)),
     "must be final, none, pythia or a list of distinct steps between 0 and train.steps"),
    ("resources.cpus_per_run", lambda v, e: 0 < v <= 1024, "must be > 0 and <= 1024"),
    ("resources.gpus_per_run", lambda v, e: 0 <= v <= 64, "must be between 0 and 64"),
]


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it in the dataclass's type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        requirements = []
        for inner in (a for a in args if a is not type(None)):
            try:
                return _coerce(inner, value, key)
            except ConfigError as e:
                requirements.append(str(e).removeprefix(f"{key}: ").rsplit(" (got ", 1)[0])
        raise ConfigError(f"{key}: {' or '.join(requirements)} (got {value!r})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)} (got {value!r})")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list (got {value!r})")
        if args[-1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: must be a list of {len(args)} values (got {value!r})")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value, strict=True))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number (got {value!r})")
        return float(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer (got {value!r})")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string (got {value!r})")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not user input


def _build_dataclass(cls: Any, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'top level'}: must be a mapping (got {data!r})")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(known)})")
        tp = hints[name]
        kwargs[name] = _build_dataclass(tp, value, key + ".") if is_dataclass(tp) else _coerce(tp, value, key)
    missing = [f.name for f in fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required key is missing")
    return cls(**kwargs)


def build_experiment(data: dict) -> Experiment:
    """Type-check and value-check a plain dict (one run's config) into an Experiment."""
    exp = _build_dataclass(Experiment, data)
    for key, ok, requirement in _RULES:
        value = _get(exp, key)
        if not ok(value, exp):
            raise ConfigError(f"{key}: {requirement} (got {value!r})")
    return exp


# --- files, includes, overrides and grids ---

class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that floats may be written as people write them: `3e-4`
    and `1E3` are numbers (YAML 1.2's rule), not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such experiment file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{line}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (got {type(data).__name__})")
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_with_includes(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include: cycle ({' -> '.join(p.name for p in (*seen, path))})")
    data = _read_yaml(path)
    include = data.pop("include", None)
    if include is None:
        return data
    if not isinstance(include, str):
        raise ConfigError(f"{path}: include: must be a file path (got {include!r})")
    base = _load_with_includes(path.parent / include, (*seen, path))
    return _deep_merge(base, data)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.steps=40` -> ("train.steps", 40); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
        raise ConfigError(f"--set {text!r}: expected key=value with a dotted key, e.g. train.steps=40")
    try:
        return key, parse_yaml(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: value is not valid YAML") from None


def _grid_values(key: str, spec: Any) -> list:
    if isinstance(spec, dict) and set(spec) == {"range"}:
        bounds = spec["range"]
        if (not isinstance(bounds, list) or len(bounds) not in (2, 3)
                or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)):
            raise ConfigError(f"grid.{key}: range must be [start, stop] or [start, stop, step] integers "
                              f"(got {bounds!r})")
        if len(bounds) == 3 and bounds[2] == 0:
            raise ConfigError(f"grid.{key}: range step must not be 0")
        # len(range) is computed without materialising, so a huge range is refused cheaply later.
        return range(*bounds)  # type: ignore[return-value]
    if not isinstance(spec, list):
        raise ConfigError(f"grid.{key}: must be a list of values or {{range: [start, stop]}} (got {spec!r})")
    return spec


def _field_type(dotted: str) -> Any:
    """The annotation of a dotted key of `Experiment`; a one-line error for a key it does not have."""
    cls: Any = Experiment
    for depth, part in enumerate(parts := dotted.split(".")):
        hints = typing.get_type_hints(cls) if is_dataclass(cls) else {}
        if part not in hints:
            where = ".".join(parts[:depth + 1])
            known = f" (known: {', '.join(hints)})" if hints else ""
            raise ConfigError(f"{where}: unknown key{known}")
        cls = hints[part]
    return cls


def _is_axis(dotted: str, value: Any) -> bool:
    """Whether a `--set` value is a grid axis: `{range: [...]}`, or a list where the key takes a
    single value (for a key that takes a list, such as train.betas, a list of lists)."""
    if isinstance(value, dict) and set(value) == {"range"}:
        return True
    if not isinstance(value, list):
        return False
    tp = _field_type(dotted)
    takes_list = any(typing.get_origin(t) is tuple for t in (tp, *typing.get_args(tp)))
    return not takes_list or (bool(value) and all(isinstance(v, list) for v in value))


def load_runs(path: str | Path, overrides: typing.Iterable[str] = ()) -> list[Run]:
    """Read an experiment file (with includes, `--set` overrides and grid) into validated runs.

    A `--set` value replaces the file's value of its key, or the grid's axis of that key; a list or
    `{range: ...}` (see `_is_axis`) makes the key an axis. Errors about a key given with `--set`
    are blamed on `--set`, the others on the file."""
    path = Path(path)
    data = _load_with_includes(path)
    settings: dict[str, Any] = {}
    axes: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        try:
            _field_type(key)
            (axes if _is_axis(key, value) else settings)[key] = value
        except ConfigError as e:
            raise ConfigError(f"--set {text}: {e}") from None
    try:
        return _expand(data, settings, axes)
    except ConfigError as e:
        blamed_on_set = next((k for k in (*settings, *axes) if str(e).startswith(f"{k}:")), None)
        raise ConfigError(f"--set {e}" if blamed_on_set else f"{path}: {e}") from None


def _expand(data: dict, settings: dict[str, Any], set_axes: dict[str, Any]) -> list[Run]:
    grid = data.pop("grid", None) or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"grid: must be a mapping of dotted keys to lists (got {grid!r})")
    for key, value in settings.items():
        grid.pop(key, None)  # an explicit --set wins over the grid
        _set_dotted(data, key, value)
    grid.update(set_axes)
    axes = {key: _grid_values(key, spec) for key, spec in grid.items()}
    count = math.prod(len(v) for v in axes.values())
    if count == 0:
        raise ConfigError(f"grid: has no runs (empty axis: {[k for k, v in axes.items() if not v][0]})")
    if count > MAX_GRID_RUNS:
        raise ConfigError(f"grid: has {count:,} runs; the limit is {MAX_GRID_RUNS:,}")
    runs: dict[str, Run] = {}
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values, strict=True))
        where = f" (grid point {', '.join(f'{k}={v!r}' for k, v in point.items())})" if point else ""
        config = json.loads(json.dumps(data))  # deep copy of plain YAML data
        try:
            for key, value in point.items():
                _set_dotted(config, key, value)
            run = Run(build_experiment(config), point, settings)
        except ConfigError as e:
            raise ConfigError(f"{e}{where}") from None
        if run.run_id in runs:
            raise ConfigError(f"grid: points {runs[run.run_id].point} and {point} give the same run")
        runs[run.run_id] = run
    return list(runs.values())
