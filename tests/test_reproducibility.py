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
PROCESSES = 3


@pytest.mark.parametrize("precision, bf16_gemm", [("bf16-true", None), ("bf16-mixed", None), ("fp32", None),
                                                  ("bf16-true", "fp32")])
def test_fresh_processes_record_the_same_bits(small_book, tmp_path, monkeypatch, precision, bf16_gemm):
    """Each precision on this CPU's bf16 GEMM path, and bf16 products through fp32 GEMMs forced
    (bf16_via_fp32; the processes inherit the variable)."""
    if bf16_gemm and not native_bf16_gemm(torch.device("cpu")):
        pytest.skip("this CPU takes the fp32-GEMM path by default: the bf16-true case above covers it")
    if bf16_gemm:
        monkeypatch.setenv(FORCE_ENV, bf16_gemm)
    runs = []
    for i in range(PROCESSES):
        runs.append(tmp_path / str(i))
        subprocess.run([sys.executable, "-m", "runner.cli", "train", str(REPO / "experiments" / "smoke.yaml"),
                        "--corpus", str(small_book), "--out", str(runs[-1]), "--quiet",
                        "--set", "train.steps=12", "--set", "train.batch_size=4", "--set", "train.threads=2",
                        "--set", f"train.precision={precision}", "--set", "record.model_steps=none"],
                       check=True, capture_output=True)
    if bf16_gemm:
        assert json.loads((runs[0] / "run.json").read_text())["implementation"]["bf16_gemm"] == bf16_gemm
    for other in runs[1:]:
        lines, identical = compare(runs[0], other)
        assert identical, "\n".join(lines)
