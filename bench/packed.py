"""N reference-experiment models trained as one stacked model: the measurement that decides whether
packing seeds pays (issue #36), run by `make bench BENCH_ARGS=--packed` in a process of its own.

Every parameter of GPT-2 (the reference shape: 2 layers, 2 heads, width 64, 128 positions, tied
embeddings) gets a leading dimension of N, every product becomes a batched one over the N models
(`torch.bmm`; attention over N x batch x heads sequences) and Adam steps the stacked tensors (it is
element-wise, so each model's update is its own). Each model draws its own batches. What is timed
is the training step alone, recording off on both sides (the runner's recording is measured on its
own in `make bench`); prints one JSON line: steps/s of the pack (each step advances every model).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

VOCAB, CONTEXT, WIDTH, LAYERS, HEADS, BATCH = 128, 128, 64, 2, 2, 32


def stacked_parameters(n: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """GPT-2's parameters for n models (GPT-2's init: normal(0, 0.02), zero biases, unit gains)."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(n, *shape, generator=g) * 0.02

    p = {"wte": normal(VOCAB, WIDTH), "wpe": normal(CONTEXT, WIDTH),
         "ln_f.w": torch.ones(n, WIDTH), "ln_f.b": torch.zeros(n, WIDTH)}
    for i in range(LAYERS):
        p |= {f"{i}.ln1.w": torch.ones(n, WIDTH), f"{i}.ln1.b": torch.zeros(n, WIDTH),
              f"{i}.qkv.w": normal(WIDTH, 3 * WIDTH), f"{i}.qkv.b": torch.zeros(n, 3 * WIDTH),
              f"{i}.proj.w": normal(WIDTH, WIDTH), f"{i}.proj.b": torch.zeros(n, WIDTH),
              f"{i}.ln2.w": torch.ones(n, WIDTH), f"{i}.ln2.b": torch.zeros(n, WIDTH),
              f"{i}.fc.w": normal(WIDTH, 4 * WIDTH), f"{i}.fc.b": torch.zeros(n, 4 * WIDTH),
              f"{i}.out.w": normal(4 * WIDTH, WIDTH), f"{i}.out.b": torch.zeros(n, WIDTH)}
    return {k: v.to(dtype).requires_grad_() for k, v in p.items()}


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (n, rows, width); each model's own gain and bias."""
    return F.layer_norm(x, (WIDTH,)) * w[:, None] + b[:, None]


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.baddbmm(b[:, None], x, w)  # (n, rows, in) @ (n, in, out) + bias


def stacked_loss(p: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The sum over models of each one's mean next-token loss; tokens (n, batch, context + 1)."""
    n, batch = tokens.shape[:2]
    inputs, targets = tokens[..., :-1], tokens[..., 1:]
    rows = batch * CONTEXT
    index = torch.arange(n)[:, None, None]
    h = (p["wte"][index, inputs] + p["wpe"][:, None]).reshape(n, rows, WIDTH)
    mask = torch.full((CONTEXT, CONTEXT), -math.inf, dtype=h.dtype).triu(1)
    head = WIDTH // HEADS
    for i in range(LAYERS):
        q, k, v = _linear(_layer_norm(h, p[f"{i}.ln1.w"], p[f"{i}.ln1.b"]), p[f"{i}.qkv.w"],
                          p[f"{i}.qkv.b"]).split(WIDTH, dim=2)
        q, k, v = (t.reshape(n * batch, CONTEXT, HEADS, head).transpose(1, 2).reshape(-1, CONTEXT, head)
                   for t in (q, k, v))
        scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=head ** -0.5)
        attended = torch.bmm(scores.softmax(-1), v).reshape(n * batch, HEADS, CONTEXT, head).transpose(1, 2)
        h = h + _linear(attended.reshape(n, rows, WIDTH), p[f"{i}.proj.w"], p[f"{i}.proj.b"])
        m = F.gelu(_linear(_layer_norm(h, p[f"{i}.ln2.w"], p[f"{i}.ln2.b"]), p[f"{i}.fc.w"], p[f"{i}.fc.b"]),
                   approximate="tanh")
        h = h + _linear(m, p[f"{i}.out.w"], p[f"{i}.out.b"])
    logits = torch.bmm(_layer_norm(h, p["ln_f.w"], p["ln_f.b"]), p["wte"].transpose(1, 2))  # tied
    losses = F.cross_entropy(logits.float().reshape(n * rows, VOCAB), targets.reshape(-1), reduction="none")
    return losses.reshape(n, rows).mean(dim=1).sum()


def measure(n: int, precision: str, steps: int, warmup: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    params = stacked_parameters(n, dtype, seed=0)
    optimizer = torch.optim.Adam(params.values(), lr=1e-3, foreach=False, fused=precision != "bf16-true" or None)
    g = torch.Generator().manual_seed(1)
    book = torch.randint(0, VOCAB, (200_000,), generator=g)  # speed does not depend on the text
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        starts = torch.randint(0, len(book) - CONTEXT - 1, (n, BATCH), generator=g)
        tokens = book[starts[..., None] + torch.arange(CONTEXT + 1)]
        optimizer.zero_grad(set_to_none=True)
        stacked_loss(params, tokens).backward()
        optimizer.step()
    seconds = time.perf_counter() - t0
    return {"n": n, "precision": precision, "threads": threads, "steps": steps, "seconds": seconds,
            "steps_per_s": steps / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, required=True, help="models in the pack")
    parser.add_argument("--precision", choices=["fp32", "bf16-true"], required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    print(json.dumps(measure(args.n, args.precision, args.steps, args.warmup, args.threads)))


if __name__ == "__main__":
    main()
