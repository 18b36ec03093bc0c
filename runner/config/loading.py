"""Experiment files into runs: YAML (with 1.2's floats), includes, `--set` overrides and grids.

Errors are one-line `ConfigError`s naming the file (or `--set`), the key and the value.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import typing
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import yaml

from runner.config.rules import build_experiment
from runner.config.schema import Experiment, Run
from runner.errors import ConfigError
from runner.files import read_regular
from runner.text import did_you_mean

MAX_GRID_RUNS = 10_000
MAX_EXPERIMENT_BYTES = 1 << 20  # read whole before parsing; a real experiment file is a few hundred bytes
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_NOT_JSON = ("binary", "set", "omap", "pairs", "timestamp")  # YAML types JSON has no value for


class _Loader(yaml.SafeLoader):
    """YAML as experiment files need it, bounded and unambiguous:

    - floats may be written as people write them: `3e-4` and `1E3` are numbers (YAML 1.2's rule),
      not strings;
    - only JSON's values: an unquoted date is a string (`name: 2024-01-01`), and `!!binary`,
      `!!set`, `!!omap`, `!!pairs` and `!!timestamp` are refused;
    - a key given twice in one mapping is refused (PyYAML would keep the last silently);
    - aliases (`*name`) are refused: an alias bomb would expand to gigabytes before any key is
      checked, and a self-referencing one never ends. Write the value out, or use `include`.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed in experiment "
                                              f"files: write the value out, or use include", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _TIMESTAMP]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _refuse(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(None, None, f"{node.tag.rpartition(':')[2]} values are not allowed (only "
                                            f"JSON's: strings, numbers, booleans, null, lists, mappings)",
                                            node.start_mark)


for _name in _NOT_JSON:
    _Loader.add_constructor(f"tag:yaml.org,2002:{_name}", _refuse)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def _read_yaml(path: Path) -> dict:
    try:
        text = read_regular(path, MAX_EXPERIMENT_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such experiment file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError) as e:  # no regular file, too large, not UTF-8
        raise ConfigError(f"{path}: cannot use as an experiment file: {e}") from None
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
    try:
        path = path.resolve()
    except RuntimeError as e:  # Python 3.11's Path.resolve on a symlink loop
        raise ConfigError(f"{path}: cannot resolve the path ({e})") from None
    if path in seen:
        raise ConfigError(f"{path}: include: cycle ({' -> '.join(p.name for p in (*seen, path))})")
    data = _read_yaml(path)
    include = data.pop("include", None)
    if include is None:
        return data
    if not isinstance(include, str):
        raise ConfigError(f"{path}: include: must be a file path (got {include!r})")
    if not (path.parent / include).exists():
        raise ConfigError(f"{path}: include: {include}: no such experiment file ({path.parent / include})")
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
        values = range(*bounds)
        try:
            len(values)  # computed without materialising; the grid's size is checked before it is built
        except OverflowError:
            raise ConfigError(f"grid.{key}: range {bounds} has more values than a grid may have runs "
                              f"({MAX_GRID_RUNS:,})") from None
        return values  # type: ignore[return-value]
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
            known = f" (known: {', '.join(hints)}){did_you_mean(part, list(hints))}" if hints else ""
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


def experiment_data(path: str | Path) -> dict:
    """An experiment file with its includes merged in: what `load_runs` reads, as one mapping (a
    sweep submitted as a job carries it as one file)."""
    return _load_with_includes(Path(path))


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
