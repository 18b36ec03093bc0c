"""`lilgatsby rm`: delete runs of an experiment (local or in a bucket) by run id, status or config
value, never one that is training, and rebuild the index after.

Runs are chosen explicitly (an id, `--status`, `--where KEY=VALUE`; all of them must hold); a run
another process is training (its lock held on a disk, its lease live in a bucket), or a directory
holding files no run writes (a user's), stops the whole removal before anything is deleted.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.config import parse_override
from runner.errors import ConfigError, RunLocked
from runner.runs.index import read_runs, rebuild_index
from runner.runs.rundir import foreign_files, is_training, listed
from runner.storage.location import Location


@dataclass(frozen=True)
class Doomed:
    run_dir: Location
    row: dict

    @property
    def size(self) -> int:
        return sum(self.run_dir.files().values())


def _matches(row: dict, run_ids: list[str], statuses: list[str], where: dict) -> bool:
    return ((not run_ids or row["run_id"] in run_ids) and (not statuses or row.get("status") in statuses)
            and all(row.get(key) == value for key, value in where.items()))


def choose(experiment_dir: Location, run_ids: list[str], statuses: list[str], where: list[str]) -> list[Doomed]:
    """The runs to delete (one-line ConfigError when nothing names them or nothing matches;
    RunLocked when one is training)."""
    if not (run_ids or statuses or where):
        raise ConfigError("rm: name the runs: run ids, --status or --where KEY=VALUE (nothing removed)")
    try:
        conditions = dict(parse_override(text) for text in where)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--set", "--where", 1)) from None
    if not experiment_dir.is_dir():
        raise ConfigError(f"{experiment_dir}: not an experiment directory (nothing removed)")
    runs = read_runs(experiment_dir)
    if not runs:
        raise ConfigError(f"{experiment_dir}: no run directories (with run.json) found")
    columns = {key for _, _, row in runs for key in row}
    for key in conditions:
        if key not in columns:
            raise ConfigError(f"--where {key}: not a column of the index (e.g. train.seed, status; nothing removed)")
    unknown = set(run_ids) - {row["run_id"] for _, _, row in runs}
    if unknown:
        raise ConfigError(f"{experiment_dir}: no run {', '.join(sorted(unknown))} (nothing removed)")
    doomed = [Doomed(run_dir, row) for run_dir, _, row in runs if _matches(row, run_ids, statuses, conditions)]
    if not doomed:
        raise ConfigError(f"{experiment_dir}: no run matches (nothing removed)")
    training = [d.row["run_id"] for d in doomed if is_training(d.run_dir)]
    if training:
        raise RunLocked(f"{experiment_dir}: {', '.join(training)}: being trained by another process (nothing removed)")
    for d in doomed:
        foreign = foreign_files(d.run_dir)
        if foreign:
            raise ConfigError(f"{d.run_dir}: holds files that are not a run's ({listed(foreign)}); remove them "
                              f"yourself (nothing removed)")
    return doomed


def remove(doomed: list[Doomed], experiment_dir: Location) -> None:
    for d in doomed:
        d.run_dir.delete_tree()
    rebuild_index(experiment_dir)
