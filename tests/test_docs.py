"""The README and docs/ document every config key (with its default), every `lilgatsby` subcommand
and every module, and their relative links resolve."""

import argparse
import dataclasses
import re
import shlex
import typing

import yaml

from runner.cli import _parser, main
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


def fenced_lines(prefix: str) -> list[tuple[str, str]]:
    """(page name, line) of every line starting with `prefix` in a ```sh block of the pages."""
    found = []
    for page, text in PAGES.items():
        for block in re.findall(r"```sh\n(.*?)```", text, re.S):
            found += [(page.name, line.split("  #")[0].strip()) for line in block.splitlines()
                      if line.startswith(prefix)]
    return found


def test_every_documented_lilgatsby_command_parses_and_dry_runs_run(capsys, monkeypatch, tmp_path):
    """Each `lilgatsby ...` line of a shell block parses with the real parser; the `sweep --dry-run`
    ones run (they read experiment files only) and exit 0."""
    commands = fenced_lines("lilgatsby ")
    assert len(commands) > 20
    monkeypatch.chdir(REPO)
    for page, line in commands:
        args = shlex.split(line)[1:]
        try:
            _parser().parse_args(args)
        except SystemExit:
            raise AssertionError(f"{page}: {line}: does not parse: {capsys.readouterr().err}") from None
        if args[0] == "sweep" and "--dry-run" in args:
            assert main([*args, "--runs", str(tmp_path / "runs")]) == 0, f"{page}: {line}"
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_every_documented_make_target_exists():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    named = {word for _, line in fenced_lines("make ") for word in line.split()[1:2]}
    named |= set(re.findall(r"`make ([a-z][\w-]*)", "\n".join(PAGES.values())))
    assert named and named <= targets, named - targets


def test_every_speed_figure_in_the_readme_names_its_cpu():
    """A paragraph of the README that quotes a speed or a time names the CPU kind it was measured on."""
    figure = re.compile(r"\d[\d.,]*\s*(steps/s|MiB/s|minutes|hours?|s vs)\b|\d\.\d+×")
    for paragraph in README.split("\n\n"):
        if figure.search(paragraph) and not paragraph.lstrip().startswith(("```", "|")):
            assert re.search(r"AVX|AMD EPYC|Apple|GPU", paragraph), paragraph
