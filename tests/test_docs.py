"""The README documents every config key (with its default) and every `lilgatsby` subcommand."""

import argparse
import dataclasses
import re
import typing

import yaml

from runner.cli import _parser
from runner.config import Experiment
from runner.runs.index import flatten_config

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def config_keys(cls: type, prefix: str = "") -> dict[str, object]:
    """Dotted key -> default of every field of the config dataclasses (name has none)."""
    keys: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(config_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else None
            keys[f"{prefix}{f.name}"] = list(default) if isinstance(default, tuple) else default
    return keys


def test_every_config_key_is_in_the_experiment_file_block_with_its_default():
    section = README[README.index("### Experiment files"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)[1]
    documented = flatten_config(yaml.safe_load(block))
    documented.pop("include")
    keys = config_keys(Experiment)
    assert set(documented) == set(keys)
    for key, default in keys.items():
        if key != "name":
            assert documented[key] == default, key


def test_every_subcommand_is_documented():
    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert len(subparsers.choices) >= 4
    for command in subparsers.choices:
        assert re.search(rf"lilgatsby {command}\b", README), command


def test_every_module_is_in_the_module_map():
    section = README[README.index("## Module map"):]
    for path in sorted((REPO / "runner").glob("*.py")):
        assert f"`{path.stem}`" in section.split("\n## ")[0], path.name
