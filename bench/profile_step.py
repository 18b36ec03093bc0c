"""`make bench-profile`: where a training step's time goes, `train.kernels: hf` (transformers' own
kernels, the runner before round 2) against `fast`, and in bf16 `fast` with its products on the
bf16 GEMM path this CPU does not take (forced: bf16_via_fp32), side by side in one process
(torch.profiler).

The reference config (batch 32 x 128 tokens), one precision per call. Each op's self time is put
in a category ("other ops": the rest); the optimizer's is its whole step. Also the step's wall time
without the profiler, and its fixed cost (the same step on a tiny batch). Prints a markdown table
of milliseconds per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner.config import load_runs  # noqa: E402
from runner.model.bf16_via_fp32 import FORCE_ENV, cpu_has_native_bf16_gemm  # noqa: E402
from runner.model.gpt2 import batch_loss, causal_mask  # noqa: E402
from runner.training.host import keep_freed_memory_mapped  # noqa: E402
from runner.training.loop import build_model_and_optimizer  # noqa: E402
from runner.training.provenance import describe_cpu  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = {
    "linear layers: projections, MLP, unembedding (mm, addmm)": ("aten::mm", "aten::addmm"),
    "attention: its two products, softmax, SDPA's fused kernel": (
        "aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "tanh-GELU": ("aten::gelu", "aten::gelu_backward", "aten::addcmul", "aten::sigmoid_"),
    "layer norms": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "cross-entropy (fp32 log-softmax)": ("aten::_log_softmax", "aten::_log_softmax_backward_data",
                                         "aten::nll_loss_forward", "aten::nll_loss_backward", "aten::fill_"),
    "elementwise add/mul (eager attention's scale and mask, residuals, ...)": ("aten::add", "aten::add_", "aten::mul",
                                                                              "aten::mul_"),
    "copies and casts": ("aten::copy_", "aten::cat"),
}
OPTIMIZER = "optimizer (Adam over 116,480 parameters)"
STEPS = 20


def make_step(precision: str, kernels: str, batch: tuple[int, int] | None = None):
    """One training step of the reference config (or of a batch of `batch` = (windows, tokens))."""
    exp = load_runs(REPO / "experiments" / "lil_gatsby.yaml",
                    [f"train.precision={precision}", f"train.kernels={kernels}"])[0].experiment
    windows, length = batch or (exp.train.batch_size, exp.model.context_length)
    cpu = torch.device("cpu")
    model, optimizer, _, _ = build_model_and_optimizer(exp, cpu)  # the runner's own, as `lilgatsby train` builds them
    mask = causal_mask(model, length, cpu)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    tokens = torch.randint(0, 128, (windows, length + 1), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        _, loss = batch_loss(model, tokens[:, :-1], tokens[:, 1:], mask, autocast, exp.train.targets)
        loss.backward()
        with record_function(OPTIMIZER):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def wall_ms(step) -> float:
    """Milliseconds per step without the profiler: the fastest of 5 rounds of STEPS steps."""
    for _ in range(10):
        step()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            step()
        rounds.append((time.perf_counter() - t0) / STEPS * 1e3)
    return min(rounds)


def _in_optimizer(event) -> bool:
    while event is not None:
        if event.name == OPTIMIZER:
            return True
        event = event.cpu_parent
    return False


def breakdown(precision: str, kernels: str, bf16_gemm: str | None = None) -> dict[str, float]:
    """Milliseconds per step: each category's op time as the profiler measures it (it slows ops a
    little), the step's wall time without the profiler, and the fixed cost of a step: the same
    step on a batch of one window of 8 tokens (Python, dispatch, autograd, optimizer overhead).
    `bf16_gemm` forces that path (else the CPU decides)."""
    if bf16_gemm:
        os.environ[FORCE_ENV] = bf16_gemm
    else:
        os.environ.pop(FORCE_ENV, None)
    step = make_step(precision, kernels)
    out: dict[str, float] = defaultdict(float)
    out["step, wall time (no profiler)"] = wall_ms(step)
    with profile() as prof:
        for _ in range(STEPS):
            step()
    category = {op: name for name, ops in CATEGORIES.items() for op in ops}
    for event in prof.events():
        if event.name == OPTIMIZER:
            out[OPTIMIZER] += event.cpu_time_total / 1e3 / STEPS
        elif not _in_optimizer(event):
            out[category.get(event.name, "other ops")] += event.self_cpu_time_total / 1e3 / STEPS
    out["all ops (profiled)"] = sum(out[name] for name in (*CATEGORIES, OPTIMIZER, "other ops"))
    out["fixed cost: the same step on 1 window of 8 tokens"] = wall_ms(make_step(precision, kernels, (1, 8)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["bf16-true", "bf16-mixed", "fp32"], default="bf16-true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory_mapped()
    columns = {"kernels: hf": breakdown(args.precision, "hf"), "kernels: fast": breakdown(args.precision, "fast")}
    if args.precision != "fp32":
        other = "fp32" if cpu_has_native_bf16_gemm() else "native"
        columns[f"fast, {FORCE_ENV}={other}"] = breakdown(args.precision, "fast", other)
    rows = [*CATEGORIES, OPTIMIZER, "other ops", "all ops (profiled)", "step, wall time (no profiler)",
            "fixed cost: the same step on 1 window of 8 tokens"]
    print(describe_cpu())
    print(f"| {args.precision}, {args.threads} threads, ms per step | {' | '.join(columns)} |\n"
          f"|---{'|---' * len(columns)}|")
    for row in rows:
        print(f"| {row} | {' | '.join(f'{column.get(row, 0):.2f}' for column in columns.values())} |")


if __name__ == "__main__":
    main()
