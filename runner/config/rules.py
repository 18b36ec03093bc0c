"""What an experiment's values may be: each YAML value checked against its field's annotation and
coerced to it, then the rules beyond types (ranges, and keys that constrain each other).

Every error is a one-line `ConfigError` naming the key and the value (`loading` adds the file).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Literal

from runner.config.schema import RECORDED_TENSORS, Experiment
from runner.errors import ConfigError
from runner.text import did_you_mean

MAX_STEPS = 10_000_000
# (dotted key, predicate(value, experiment), requirement)
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
    ("record.format", lambda v, e: v == "full" or e.record.replayable,
     "compact needs record.every 1 and W, grads, momentum and variance in record.tensors (W and Adam's moments "
     "are replayed from every step's gradient)"),
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
            raise ConfigError(f"{key}: unknown key (known: {', '.join(known)}){did_you_mean(name, known)}")
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
