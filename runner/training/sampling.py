"""Text sampled from a trained model: a glance at what it learned, kept in run.json."""

from __future__ import annotations

import torch

from runner.data.tokenizer import build_tokenizer, encode

PROMPTS = ("In my younger", "Gatsby", "The green light")
SAMPLE_TOKENS, SAMPLE_TEMPERATURE = 50, 0.8


@torch.no_grad()
def sample_text(model, *, seed: int, device: torch.device) -> dict[str, str]:
    """Temperature-0.8 samples (no top-k) of up to 50 new tokens per prompt, seeded by the run seed.
    Sampling runs in fp32 (the final weights upcast exactly): bf16 kernels for every new sequence
    length would cost more memory than the whole training loop."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model.eval()
    samples = {}
    for prompt in PROMPTS:
        ids = encode(prompt)[None].to(device)
        length = min(ids.shape[1] + SAMPLE_TOKENS, model.config.n_positions)  # prompt and new tokens
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_length=length, do_sample=True,
                             temperature=SAMPLE_TEMPERATURE, top_k=0, pad_token_id=tokenizer.pad_token_id)
        samples[prompt] = str(tokenizer.decode(out[0]))
    return samples
