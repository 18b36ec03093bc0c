"""`lilgatsby`: train one experiment, sweep a grid on Ray, rebuild an index, verify or compare
recordings, report an experiment's runs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from runner.config import load_runs
from runner.errors import ConfigError, UserError
from runner.interrupt import EXIT_TERMINATED, by_sigterm, sigint_as_ctrl_c, sigterm_as_interrupt
from runner.layout import INDEX_JSONL, RunFiles, is_transient, recording_of
from runner.settings import check_environment
from runner.storage.location import Location, at, unless_read_only
from runner.storage.s3 import StorageError
from runner.text import mib, plural

log = logging.getLogger("runner.cli")
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130  # 130: Ctrl-C (128 + SIGINT), as shells report it
EXAMPLES = {
    "train": """
  lilgatsby train experiments/smoke.yaml                      # runs/smoke/<run id>/
  lilgatsby train experiments/smoke.yaml --set train.lr=3e-4 --set train.precision=fp32
  lilgatsby train experiments/smoke.yaml --out /tmp/smoke     # any run directory
  (Ctrl-C marks the run cancelled, exits 130; the same command resumes it from its last checkpoint)""",
    "sweep": """
  lilgatsby sweep experiments/smoke_sweep.yaml --dry-run      # the runs, their disk and time
  lilgatsby sweep experiments/smoke_sweep.yaml
  lilgatsby sweep experiments/seed_sweep.yaml --set 'train.seed={range: [0, 4]}'   # replace an axis
  lilgatsby sweep experiments/seed_sweep.yaml --address 127.0.0.1:6379             # join a cluster
  lilgatsby sweep experiments/seed_sweep.yaml --address http://127.0.0.1:8265 --runs s3://lab-runs/sweeps
                                                       # submit it to a cluster as a Ray job, from any machine
  lilgatsby sweep experiments/seed_sweep.yaml --slurm --nodes 4 --runs /shared/runs --sbatch="--time=04:00:00"
                                                       # submit it to Slurm, from a login node
  lilgatsby sweep experiments/smoke_sweep.yaml --runs s3://lab-runs/sweeps         # runs root in a bucket""",
    "verify": """
  lilgatsby verify runs/smoke/30509a8442aa                   # one run directory (or its recording)
  lilgatsby verify runs/smoke_sweep                          # every run of an experiment""",
    "index": """
  lilgatsby index runs                                        # every experiment under runs/
  lilgatsby index runs/smoke_sweep""",
    "compare": """
  lilgatsby compare runs/smoke/30509a8442aa /tmp/smoke        # exit 0: bit-identical""",
    "rm": """
  lilgatsby rm runs/smoke_sweep --status failed --dry-run     # what would go
  lilgatsby rm runs/smoke_sweep 04704f7edb7e                  # one run, by id
  lilgatsby rm s3://lab-runs/sweeps/seed_sweep --where train.seed=3""",
    "pull": """
  lilgatsby pull s3://lab-runs/sweeps/seed_sweep                # -> runs/seed_sweep/
  lilgatsby pull s3://lab-runs/sweeps/seed_sweep/0f3a9c1e2b4d --runs /data/runs""",
    "compact": """
  lilgatsby compact runs/seed_sweep                           # every complete run of the experiment
  lilgatsby compact runs/lil_gatsby/0f3a9c1e2b4d s3://lab-runs/sweeps/seed_sweep/1c2d3e4f5a6b""",
    "expand": """
  lilgatsby expand runs/seed_sweep/0f3a9c1e2b4d --out /tmp/full.safetensors""",
    "report": """
  lilgatsby report runs/smoke_sweep                           # -> runs/smoke_sweep/report/report.html
  lilgatsby report experiments/smoke_sweep.yaml --out /tmp/report
  lilgatsby report runs/smoke/30509a8442aa                    # one run
  lilgatsby report s3://lab-runs/sweeps/smoke_sweep --out /tmp/report
  lilgatsby report runs/seed_sweep --watch 30                 # redrawn every 30 s while the runs train""",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lilgatsby", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, epilog="examples:" + EXAMPLES[name],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    def experiment_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("experiment", type=Path, help="experiment YAML file")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.steps=40 (repeatable)")
        p.add_argument("--corpus", metavar="PATH", help="the book as a local file (same as --set corpus.path=PATH)")
        p.add_argument("--runs", default="runs", help="runs root: a directory or s3://bucket/prefix (default: runs/)")
        p.add_argument("--force", action="store_true", help="train again even if the run is complete")
        p.add_argument("--restart", action="store_true",
                       help="start interrupted runs over instead of resuming them from their last checkpoint")

    train = command("train", "run one experiment locally, without Ray")
    experiment_args(train)
    train.add_argument("--out", help="run directory, local or s3:// (default: <runs>/<name>/<run id>/)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--point", type=int, help=argparse.SUPPRESS)  # a Slurm array task: this grid point
    train.add_argument("--submission", type=Path, help=argparse.SUPPRESS)  # a Slurm array task: what to check

    sweep = command("sweep", "run every point of an experiment's grid on Ray (or as a Slurm job array)")
    experiment_args(sweep)
    sweep.add_argument("--dry-run", action="store_true",
                       help="list the runs, the disk and the time they need; run nothing")
    sweep.add_argument("--address", help="join a Ray cluster (auto or HOST:PORT), or submit the sweep to one as a "
                                         "job (its dashboard's http://HOST:8265; default: $RAY_ADDRESS, "
                                         "else start a local instance)")
    sweep.add_argument("--detach", action="store_true",
                       help="with --slurm or an http:// --address: submit the job and return, without following it")
    sweep.add_argument("--slurm", action="store_true",
                       help="submit the sweep to Slurm with sbatch (from a login node) and follow it")
    sweep.add_argument("--nodes", type=int, default=1, help="with --slurm: the nodes the job asks for (default 1)")
    sweep.add_argument("--sbatch", metavar="OPTIONS",
                       help="with --slurm: sbatch options, e.g. --sbatch=\"--partition=gpu --time=02:00:00\" "
                            "(default: $LILGATSBY_SBATCH_ARGS)")
    sweep.add_argument("--requeue", action="store_true",
                       help="with --slurm: requeue the job when it nears its time limit (and on preemption)")
    sweep.add_argument("--slurm-array", action="store_true",
                       help="submit a Slurm job array instead: a task per grid point still to train, no Ray")
    sweep.add_argument("--array-limit", type=int, metavar="N",
                       help="with --slurm-array: at most N tasks at once (sbatch's --array=...%%N)")
    sweep.add_argument("--expect-nodes", type=int, default=0, help=argparse.SUPPRESS)  # in a Slurm job
    sweep.add_argument("--submission", type=Path, help=argparse.SUPPRESS)  # in a submitted job: what to check
    sweep.add_argument("--max-retries", type=int, default=2, help="retries of a run lost with its worker")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")

    verify = command("verify", "check recordings: header, layout, metadata, NaN/Inf, Adam relation")
    verify.add_argument("paths", nargs="+",
                        help="recordings, run directories or experiment directories (local or s3://)")

    index = command("index", "rebuild index.jsonl/index.csv from the run manifests")
    index.add_argument("runs_dir", help="a runs root or one experiment's directory (local or s3://)")

    compare = command("compare", "how two recordings differ, tensor by tensor (exit 0: identical)")
    compare.add_argument("a", help="a recording or run directory (local or s3://)")
    compare.add_argument("b", help="another (local or s3://)")

    report = command("report", "figures and an offline HTML page of an experiment's runs (or of one run)")
    report.add_argument("experiment", help="an experiment's directory (runs/<name>/ or s3://…/<name>), its "
                                           "experiment YAML file, or one run directory")
    report.add_argument("--runs", default="runs", help="runs root, for an experiment file (default: runs/)")
    report.add_argument("--out", type=Path, help="a local directory to write it to (default: report/ in the "
                                                 "directory reported, in the bucket for s3://)")
    report.add_argument("--run", dest="run_id", metavar="RUN_ID",
                        help="the run (id or directory name) whose dead tokens are drawn one by one "
                             "(default: the first complete run in group order)")
    report.add_argument("--watch", type=float, metavar="SECONDS", nargs="?", const=30.0,
                        help="redraw it every SECONDS (default 30) until interrupted; the page reloads itself")

    rm = command("rm", "delete runs of an experiment by id, status or config value (never one that is training)")
    rm.add_argument("experiment_dir", help="an experiment's directory (local or s3://)")
    rm.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to delete")
    rm.add_argument("--status", action="append", default=[], help="runs with this status (repeatable)")
    rm.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="runs whose index column KEY holds VALUE, e.g. train.seed=3 (repeatable)")
    rm.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")

    pull = command("pull", "bring an experiment (or one run) down from a bucket to a local runs root")
    pull.add_argument("source", help="s3://bucket/prefix/<name> or s3://bucket/prefix/<name>/<run id>")
    pull.add_argument("--runs", type=Path, default=Path("runs"), help="local runs root (default: runs/)")
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    compact = command("compact", "rewrite complete runs' full recordings in the compact format, in place "
                                 "(bf16-true; each checked bit for bit first)")
    compact.add_argument("paths", nargs="+",
                         help="recordings, run directories or experiment directories (local or s3://)")
    compact.add_argument("--quiet", action="store_true", help="no progress bar")

    expand = command("expand", "write a recording (either format) in the full format to a file")
    expand.add_argument("path", help="a recording or run directory (local or s3://)")
    expand.add_argument("--out", required=True, help="the file to write (local or s3://); must not exist")
    expand.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lilgatsby")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"


def _overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides, with --corpus PATH as corpus.path=PATH."""
    return args.overrides + ([f"corpus.path={args.corpus}"] if args.corpus else [])


def cmd_train(args: argparse.Namespace) -> int:
    from runner.runs.rundir import is_complete, tidy_complete

    runs = load_runs(args.experiment, _overrides(args))
    if args.point is not None:  # one task of a Slurm array: its point of the grid
        if not 0 <= args.point < len(runs):
            raise ConfigError(f"--point {args.point}: the grid has {plural(len(runs), 'run')}")
        runs = [runs[args.point]]
    if len(runs) != 1:
        raise ConfigError(f"{args.experiment}: grid: has {plural(len(runs), 'run')}; use `lilgatsby sweep` for grids")
    if args.submission:
        from runner.launch.submission import check_submission

        check_submission(args.submission, args.corpus)
    (spec,) = runs
    out = at(args.out, "--out") if args.out else None
    run_dir = out or at(args.runs, "--runs") / spec.experiment.name / spec.run_id
    run_dir.parent.probe()
    if not args.force and is_complete(run_dir, spec.experiment):
        tidy_complete(run_dir)
        log.info("%s is already complete (use --force to train again)", run_dir)
        return 0
    # the training stack (torch, transformers: seconds to import) only once the input is valid
    from runner.launch.run_at import train_at
    from runner.runs.index import rebuild_index

    manifest = train_at(spec.experiment, run_dir, overrides=spec.overrides, grid_point=spec.point,
                        progress=not args.quiet, restart=args.restart, force=args.force)
    if out is None:
        rebuild_index(run_dir.parent)
    for prompt, text in manifest["samples"].items():  # (train.log has them too)
        print(f"sample {prompt!r} -> {text!r}")
    metrics = manifest["metrics"]
    print(f"{run_dir}: final loss {metrics['final_loss']:.4f}, {metrics['steps_per_s']:.1f} steps/s, "
          f"{manifest['recording']['bytes'] / 2**20:.1f} MiB recording, {manifest['n_params']:,} parameters")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from runner.launch.job import is_job_address, submit
    from runner.launch.submission import check_submission

    address, runs_root = args.address or os.environ.get("RAY_ADDRESS"), at(args.runs, "--runs")
    slurm = args.slurm or args.slurm_array
    slurm_only = [o for o, given in (("--nodes", args.nodes != 1), ("--sbatch", args.sbatch is not None),
                                     ("--requeue", args.requeue)) if given]
    if slurm_only and not slurm:
        raise ConfigError(f"{slurm_only[0]}: only with --slurm or --slurm-array")
    if args.array_limit is not None and not args.slurm_array:
        raise ConfigError("--array-limit: only with --slurm-array")
    if args.slurm_array and (args.slurm or args.nodes != 1):
        raise ConfigError(f"--slurm-array: a task per run on a node of Slurm's choosing; not with "
                          f"{'--slurm' if args.slurm else '--nodes'}")
    if args.detach and not (slurm or is_job_address(address)):
        raise ConfigError("--detach: only with --slurm or a dashboard's http://HOST:PORT as --address (a job)")
    if slurm and args.address:
        raise ConfigError(f"{'--slurm' if args.slurm else '--slurm-array'}: the job runs where Slurm puts it; "
                          f"--address is not for it")
    if slurm and not args.dry_run:
        from runner.launch.slurm import submit as submit_to_slurm

        return submit_to_slurm(args.experiment, _overrides(args), runs_root, nodes=args.nodes, sbatch=args.sbatch,
                               array=args.slurm_array, array_limit=args.array_limit, requeue=args.requeue,
                               force=args.force, restart=args.restart, max_retries=args.max_retries,
                               detach=args.detach)
    if is_job_address(address) and not args.dry_run:
        return submit(args.experiment, _overrides(args), runs_root, address=address, force=args.force,
                      restart=args.restart, max_retries=args.max_retries, detach=args.detach)
    if args.submission:  # the driver of a submitted sweep (a Ray job, a Slurm job): `ray job stop` sends SIGINT
        sigint_as_ctrl_c()
        check_submission(args.submission, args.corpus)
    from runner.launch.sweep import sweep

    return sweep(args.experiment, _overrides(args), runs_root, address=address, force=args.force,
                 dry_run=args.dry_run, max_retries=args.max_retries, progress=not args.quiet, restart=args.restart,
                 expect_nodes=args.expect_nodes)


def cmd_verify(args: argparse.Namespace) -> int:
    from runner.recording.verify import has_digests, verify_at

    failed = 0
    for path in [run for given in args.paths for run in _recordings_below(at(given, "path"))]:
        problems = verify_at(path)
        for problem in problems:
            print(problem)
        if not problems:
            print(f"{path}: ok" + ("" if has_digests(path) else " (written before recordings held digests: "
                                                                 "its values are checked, not every byte)"))
        failed += bool(problems)
    return 1 if failed else 0


def cmd_compact(args: argparse.Namespace) -> int:
    from runner.analysis.metrics import is_current, note_source
    from runner.recording.format import is_compact
    from runner.recording.rows import RowReader
    from runner.runs.reformat import compact_run

    for path in [run for given in args.paths for run in _recordings_below(at(given, "path"), "not compacted")]:
        with RowReader(recording_of(path)) as reader:
            already = is_compact(reader.metadata)
        if already:
            print(f"{path}: already compact")
            continue
        run_dir = recording_of(path).parent
        metrics_current = is_current(run_dir)
        print(compact_run(path, progress=not args.quiet))
        if metrics_current:  # the same numbers: metrics.csv need not be computed again
            note_source(run_dir)
    return 0


def cmd_expand(args: argparse.Namespace) -> int:
    from runner.runs.reformat import expand_run

    print(expand_run(at(args.path, "path"), args.out, progress=not args.quiet))
    return 0


def _recordings_below(path: Location, skipped: str = "not verified") -> list[Location]:
    """A recording or run directory as it is; an experiment directory (or runs root) as its run
    directories (those whose run is not complete yet are said so, `skipped`, and left out)."""
    from runner.runs.index import experiment_dirs, read_runs

    files, is_dir = RunFiles(path), path.is_dir()  # (in a bucket, each look is a request)
    if not is_dir and not path.exists():
        raise UserError(f"{path}: no such recording, run directory or experiment directory")
    if not is_dir or files.manifest.exists() or files.recording.exists():
        return [path]
    runs = [run for exp_dir in experiment_dirs(path) for run in read_runs(exp_dir)]
    if not runs:
        raise UserError(f"{path}: no recording, run directory or experiment directory")
    status = {run_dir: (manifest or {}).get("status") or row["status"] for run_dir, manifest, row in runs}
    for run_dir, said in status.items():
        if said != "complete":
            print(f"{run_dir}: {said or 'no status'}, {skipped}")
    return [run_dir for run_dir, said in status.items() if said == "complete"]


def cmd_index(args: argparse.Namespace) -> int:
    from runner.runs.index import experiment_dirs, read_runs, write_index

    root = at(args.runs_dir, "runs_dir")
    if not root.is_dir():
        raise ConfigError(f"{root}: not a directory")
    dirs = experiment_dirs(root)
    if not dirs:
        raise ConfigError(f"{root}: no run directories (with run.json) found")
    for d in dirs:
        rows = [row for _, _, row in read_runs(d)]
        with unless_read_only(d / INDEX_JSONL):  # a reader is told the count; the index is not written back
            write_index(d, rows)
        print(f"{d}: {plural(len(rows), 'run')} indexed")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from runner.analysis.compare import compare

    lines, identical = compare(at(args.a, "a"), at(args.b, "b"))
    print("\n".join(lines))
    return 0 if identical else 1


def cmd_report(args: argparse.Namespace) -> int:
    from runner.analysis.report import report, watch

    experiment_dir = at(args.experiment, "experiment")
    if experiment_dir.local is not None and experiment_dir.local.suffix in (".yaml", ".yml"):
        experiment_dir = at(args.runs, "--runs") / load_runs(experiment_dir.local)[0].experiment.name
    if args.watch is None:
        print(report(experiment_dir, args.out, args.run_id))
        return 0
    if args.watch < 1:
        raise ConfigError(f"--watch {args.watch:g}: must be at least 1 second")
    try:
        watch(experiment_dir, args.out, args.run_id, args.watch, on_page=lambda page: print(page, flush=True))
    except KeyboardInterrupt:  # how watching ends
        print("lilgatsby: stopped watching; the last page stays as it was drawn", file=sys.stderr)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from runner.runs.remove import choose, remove

    experiment_dir = at(args.experiment_dir, "experiment_dir")
    doomed = choose(experiment_dir, args.run_ids, args.status, args.where)
    for d in doomed:
        print(f"{'would remove' if args.dry_run else 'removing'} {d.run_dir} ({d.row.get('status')}, "
              f"{mib(d.size)})")
    if not args.dry_run:
        remove(doomed, experiment_dir)
        print(f"{experiment_dir}: {plural(len(doomed), 'run')} removed; index rebuilt")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from runner.runs.index import rebuild_index

    source = at(args.source, "source")
    if source.s3 is None or not source.s3.key:
        raise ConfigError(f"source: {args.source}: not s3://bucket/prefix/<experiment>[/<run id>]")
    single = RunFiles(source).manifest.exists()
    experiment_dir = args.runs / (source.parent.name if single else source.name)
    target = experiment_dir / source.name if single else experiment_dir
    size = source.download_tree(target, skip=is_transient, progress=not args.quiet)
    if size == 0:
        raise UserError(f"{source}: nothing there")
    rows = rebuild_index(experiment_dir)
    print(f"{target}: {mib(size)} from {source}; {experiment_dir}: {plural(len(rows), 'run')} indexed")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # step lines go to train.log; the console has a bar
        handler.addFilter(lambda record: not record.name.startswith("runner.progress"))
    logging.getLogger("runner").setLevel(logging.INFO)
    commands = {"train": cmd_train, "sweep": cmd_sweep, "verify": cmd_verify, "index": cmd_index,
                "compare": cmd_compare, "report": cmd_report, "pull": cmd_pull, "rm": cmd_rm,
                "compact": cmd_compact, "expand": cmd_expand}
    try:
        check_environment()
        with logging_redirect_tqdm(), sigterm_as_interrupt():
            return commands[args.command](args)
    except (UserError, StorageError) as e:  # bad input, or the environment (a bucket's server, after retries)
        print(f"lilgatsby: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # the environment: a read-only or full disk, a symlink loop, /proc (run.json says it too)
        where = f"{e.filename}: " if e.filename else ""
        print(f"lilgatsby: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as interrupt:
        if by_sigterm(interrupt):
            print("lilgatsby: terminated (SIGTERM)", file=sys.stderr)
            return EXIT_TERMINATED
        print("lilgatsby: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
