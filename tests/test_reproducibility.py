"""The same config, seed, threads and machine give the same bits, in fresh processes, in every precision."""

import json
import subprocess
import sys

import pytest
import torch

from runner.analysis.compare import compare
from runner.model.bf16_via_fp32 import FORCE_ENV, native_bf16_gemm

from conftest import REPO

pytestmark = pytest.mark.slow
# Each process trains every case, in an order rotated by one per process: every case runs first in
# a fresh process once and after the others in the rest (as in a sweep's worker), and all must agree.
TRAIN_CASES = """
import os, sys
from pathlib import Path
from runner.config import load_runs
from runner.launch.train import run
experiment, book, out, force_env, *cases = sys.argv[1:]
inherited = os.environ.get(force_env, "")
for case in cases:
    precision, _, gemm = case.partition("+")  # "bf16-true+fp32": that bf16 GEMM path forced
    os.environ[force_env] = gemm or inherited
    (spec,) = load_runs(experiment, [f"corpus.path={book}", "train.steps=12", "train.batch_size=4",
                                     "train.threads=2", f"train.precision={precision}", "record.model_steps=none"])
    run(spec.experiment, Path(out) / case, progress=False)
"""


def test_fresh_processes_record_the_same_bits(small_book, tmp_path):
    """Each precision on this CPU's bf16 GEMM path, and where that is torch's own, bf16-true with
    its products through fp32 GEMMs forced (bf16_via_fp32)."""
    cases = ["bf16-true", "bf16-mixed", "fp32"]
    if native_bf16_gemm(torch.device("cpu")):  # elsewhere it is the bf16 cases' own path
        cases.append("bf16-true+fp32")
    processes = [tmp_path / str(i) for i in range(3)]
    for i, out in enumerate(processes):
        order = cases[i:] + cases[:i]
        subprocess.run([sys.executable, "-c", TRAIN_CASES, str(REPO / "experiments" / "smoke.yaml"), str(small_book),
                        str(out), FORCE_ENV, *order], check=True, capture_output=True)
    for case in cases:
        implementation = json.loads((processes[0] / case / "run.json").read_text())["implementation"]
        assert implementation.get("bf16_gemm", "native") == ("fp32" if case.endswith("+fp32") or (
            case != "fp32" and not native_bf16_gemm(torch.device("cpu"))) else "native"), case
        for other in processes[1:]:
            lines, identical = compare(processes[0] / case, other / case)
            assert identical, f"{case}:\n" + "\n".join(lines)
