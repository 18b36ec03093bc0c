"""The same config, seed, threads and machine give the same bits, in fresh processes, in every precision."""

import subprocess
import sys

import pytest

from runner.analysis.compare import compare

from conftest import REPO

pytestmark = pytest.mark.slow
PROCESSES = 3


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "fp32"])
def test_fresh_processes_record_the_same_bits(small_book, tmp_path, precision):
    runs = []
    for i in range(PROCESSES):
        runs.append(tmp_path / str(i))
        subprocess.run([sys.executable, "-m", "runner.cli", "train", str(REPO / "experiments" / "smoke.yaml"),
                        "--corpus", str(small_book), "--out", str(runs[-1]), "--quiet",
                        "--set", "train.steps=12", "--set", "train.batch_size=4", "--set", "train.threads=2",
                        "--set", f"train.precision={precision}", "--set", "record.model_steps=none"],
                       check=True, capture_output=True)
    for other in runs[1:]:
        lines, identical = compare(runs[0], other)
        assert identical, "\n".join(lines)
