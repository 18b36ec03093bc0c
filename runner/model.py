"""The tiny GPT-2: transformers' GPT2LMHeadModel with tied embedding/unembedding."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from runner.config import ModelConfig
from runner.tokenizer import BOS, EOS


def gpt2_config(cfg: ModelConfig) -> GPT2Config:
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.hidden_dim,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        tie_word_embeddings=True,  # E = W^T, as in Qwen3-4B: dead tokens' rows move only through W's gradient
        bos_token_id=ord(BOS),
        eos_token_id=ord(EOS),
        pad_token_id=ord(EOS),
    )


def build_model(cfg: ModelConfig, seed: int) -> GPT2LMHeadModel:
    """Initialise on the CPU in fp32 from `seed`, so the initial weights do not depend on the device."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config(cfg))


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (the tied matrix counts once): 116,480 for the reference config."""
    return sum(p.numel() for p in model.parameters())
