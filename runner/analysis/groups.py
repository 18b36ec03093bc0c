"""Which runs a report may average: runs whose configs differ in the seed alone.

An experiment directory can hold runs of several configs: its grid, runs trained with `--set`,
runs moved in from elsewhere. The runs are grouped by the value of every config key that differs
among them and changes what a run computes (see `runner.config.non_identity_keys`), except the
seed; a group is then a set of seeds of one config, and only it is drawn as a mean with a band.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runner.config import build_experiment, non_identity_keys
from runner.errors import ConfigError
from runner.runs.index import flatten_config, value_order
from runner.storage.location import Location

SEED = "train.seed"


@dataclass
class RunEntry:
    """One run directory of a report: where it is, its index row, and its full config, flattened."""

    run_dir: Location
    row: dict
    config: dict[str, Any]

    @property
    def status(self) -> str:
        return self.row["status"]


@dataclass
class Group:
    """Runs that differ in the seed alone; `values` are the keys that set this group apart."""

    values: dict[str, Any]
    runs: list[RunEntry]
    label: str

    @property
    def seeds(self) -> list[int]:
        return sorted(r.config[SEED] for r in self.runs)


def full_config(manifest: dict) -> dict[str, Any]:
    """The run's config, flattened, with every key a newer version added at its default (a run
    trained before a key existed computed that default); as written when it no longer validates."""
    config = manifest.get("config", {})
    try:
        config = build_experiment(config).to_dict()
    except ConfigError:
        pass
    return flatten_config(config)


def _same(values: list) -> bool:
    return len({json.dumps(v, sort_keys=True) for v in values}) == 1


def varying_keys(entries: list[RunEntry]) -> tuple[list[str], list[str]]:
    """The keys whose values differ among the runs: (those that change what a run computes, except
    the seed; those that do not, such as corpus.path), each in config order."""
    keys = list(dict.fromkeys(k for e in entries for k in e.config))
    differing = [k for k in keys if not _same([e.config.get(k) for e in entries])]
    passive = non_identity_keys()
    return [k for k in differing if k not in passive and k != SEED], [k for k in differing if k in passive]


def short_names(keys: list[str]) -> dict[str, str]:
    """`train.lr` -> `lr` where the last part alone is unambiguous among `keys`."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: name if last.count(name) == 1 else k for k, name in zip(keys, last, strict=True)}


def group_runs(entries: list[RunEntry], fallback_label: str) -> tuple[list[Group], list[str]]:
    """The runs grouped by the values of the varying keys, groups in value order (numbers by value);
    and those keys. With no varying key there is one group, labelled `fallback_label`."""
    keys, _ = varying_keys(entries)
    names = short_names(keys)
    by_values: dict[str, Group] = {}
    for e in entries:
        values = {k: e.config.get(k) for k in keys}
        key = json.dumps(values, sort_keys=True)
        label = ", ".join(f"{names[k]}={v}" for k, v in values.items()) or fallback_label
        by_values.setdefault(key, Group(values, [], label)).runs.append(e)
    groups = sorted(by_values.values(), key=lambda g: tuple(value_order(g.values[k]) for k in keys))
    for g in groups:
        g.runs.sort(key=lambda e: value_order(e.config.get(SEED)))
    return groups, keys


def shared_config(entries: list[RunEntry]) -> dict[str, Any]:
    """The keys every run has with the same value, nested again as in an experiment file."""
    keys = list(dict.fromkeys(k for e in entries for k in e.config))
    nested: dict[str, Any] = {}
    for k in keys:
        values = [e.config.get(k) for e in entries]
        if _same(values):
            *sections, name = k.split(".")
            node = nested
            for section in sections:
                node = node.setdefault(section, {})
            node[name] = values[0]
    return nested
