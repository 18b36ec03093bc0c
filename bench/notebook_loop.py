"""The baseline: a faithful re-implementation of the researcher's notebook loop (experiment 1.12a).

HF GPT-2 with its default kernels (gelu_new, SDPA), the whole model cast to bf16 (or left in fp32),
`DataLoader(shuffle=True)` over a per-item Dataset with default collation, `labels=` loss, the
snapshots copied into preallocated history tensors every step, and one save_file at the end.
Prints one JSON line: steps, steps/s of the training loop, and seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner.data.corpus import load_corpus  # noqa: E402  (the same cleaned text as the runner)
from runner.data.tokenizer import encode  # noqa: E402


class WindowDataset(Dataset):
    def __init__(self, tokens: torch.Tensor, context: int):
        self.tokens, self.context = tokens, context

    def __len__(self):
        return len(self.tokens) - self.context

    def __getitem__(self, idx):
        return self.tokens[idx:idx + self.context], self.tokens[idx + 1:idx + self.context + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    parser.add_argument("--corpus", help="the book (default: as the runner finds it)")
    args = parser.parse_args()
    t_start = time.perf_counter()
    vocab, hidden, context, batch = 128, 64, 128, 32
    dataset = WindowDataset(encode(load_corpus(args.corpus, "drop").text), context)
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=hidden, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers types .to() without self
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = args.steps + 1
    history = {"W": torch.zeros(n, vocab, hidden, dtype=torch.bfloat16),
               "grads": torch.zeros(n, vocab, hidden, dtype=torch.bfloat16),
               "momentum": torch.zeros(n, vocab, hidden), "variance": torch.zeros(n, vocab, hidden),
               "logits": torch.zeros(n, vocab), "loss": torch.zeros(n)}
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    W = model.lm_head.weight
    with torch.no_grad():
        history["W"][0] = W
        x0, _ = next(iter(loader))
        history["logits"][0] = model(x0).logits[:, -1, :].mean(dim=0).float()
    t_loop = time.perf_counter()
    batches = iter(loader)
    for step in range(1, n):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        optimizer.zero_grad()
        outputs = model(x, labels=y)
        outputs.loss.backward()
        with torch.no_grad():
            history["W"][step] = W
            history["grads"][step] = W.grad
            state = optimizer.state.get(W, {})
            if "exp_avg" in state:
                history["momentum"][step] = state["exp_avg"].float()
                history["variance"][step] = state["exp_avg_sq"].float()
            history["logits"][step] = outputs.logits[:, -1, :].mean(dim=0).float()
            history["loss"][step] = outputs.loss.float()
        optimizer.step()
    loop_s = time.perf_counter() - t_loop
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(history, str(args.out), metadata={"final_loss": str(history["loss"][-1].item())})
    print(json.dumps({"steps": args.steps, "steps_per_s": args.steps / loop_s, "train_s": loop_s,
                      "wall_s": time.perf_counter() - t_start}))


if __name__ == "__main__":
    main()
