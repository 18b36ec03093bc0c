"""The README and docs/ document every config key (with its default), every `lilgatsby` subcommand
and every module, and their relative links resolve."""

import argparse
import dataclasses
import re
import typing

import yaml

from runner.cli import _parser
from runner.config import Experiment
from runner.runs.index import flatten_config

from conftest import REPO

PAGES = {p: p.read_text(encoding="utf-8") for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
README = PAGES[REPO / "README.md"]


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
    page = PAGES[REPO / "docs" / "experiments.md"]
    section = page[page.index("## Experiment files"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)[1]
    documented = flatten_config(yaml.safe_load(block))
    documented.pop("include")
    keys = config_keys(Experiment)
    assert set(documented) == set(keys)
    for key, default in keys.items():
        if key != "name":
            assert documented[key] == default, key


def table_rows(text: str, heading: str) -> list[str]:
    """The first cells of the table under `heading`."""
    section = text[text.index(heading):]
    section = section.split("\n## ", 1)[0]
    return [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")][1:]


def test_every_subcommand_has_a_row_in_the_command_table():
    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    rows = {cell.strip("`").split()[1] for cell in table_rows(README, "## Commands")}
    assert rows == set(subparsers.choices)


def test_every_module_has_a_row_in_the_module_map():
    rows = {cell.strip("`") for cell in table_rows(PAGES[REPO / "docs" / "development.md"], "## Module map")}
    modules = {str(p.relative_to(REPO)) for p in (REPO / "runner").rglob("*.py")  # packages: their docstring
               if p.name != "__init__.py" or p.parent == REPO / "runner"}
    assert rows == modules


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_resolves():
    for page, text in PAGES.items():
        for target in re.findall(r"\]\(([^)]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target}"
            if anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(encoding="utf-8"), re.M)
                assert anchor in {slug(h) for h in headings}, f"{page.name}: {target}"
