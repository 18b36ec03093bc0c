"""The tiny GPT-2: transformers' GPT2LMHeadModel, its embedding tied to its unembedding (or not:
`model.tie_embeddings`)."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from runner.config import ModelConfig
from runner.data.tokenizer import BOS, EOS
from runner.model.kernels import HF_DEFAULTS, Kernels, use_kernels


def gpt2_config(cfg: ModelConfig, kernels: Kernels = HF_DEFAULTS) -> GPT2Config:
    config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.hidden_dim,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        # E = W, as in Qwen3-4B: dead tokens' rows move only through W's gradient; untied, the control
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=ord(BOS),
        eos_token_id=ord(EOS),
        pad_token_id=ord(EOS),
        activation_function=kernels.activation_function,
    )
    config._attn_implementation = kernels.attention
    return config


def build_model(cfg: ModelConfig, seed: int, kernels: Kernels = HF_DEFAULTS) -> GPT2LMHeadModel:
    """Initialise on the CPU in fp32 from `seed`, so the initial weights do not depend on the device
    (nor on the kernels chosen, which have no parameters)."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(cfg, kernels))
    use_kernels(model, kernels)
    # What a snapshot generates by default: at most the positions the model has (without a limit,
    # text-generation pipelines ask for 256 new tokens and run off the position table).
    model.generation_config.max_length = cfg.n_positions
    return model


def causal_mask(model: GPT2LMHeadModel, length: int, device: torch.device) -> torch.Tensor | None:
    """The additive causal mask eager attention uses (0 on and below the diagonal, the dtype's minimum
    above it, in the embeddings' dtype), built once: transformers rebuilds it for every batch (~3 %
    of a CPU step) unless given a prepared 4D mask, which it uses as-is. Same values, same bits.
    None for SDPA, which keeps its causal flag."""
    if model.config._attn_implementation != "eager":
        return None
    dtype = model.transformer.wte.weight.dtype
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]


def batch_loss(model: GPT2LMHeadModel, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None,
               autocast: torch.autocast, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the loss of one batch. `next-token`: the cross-entropy of every position
    against the next token, in fp32, outside autocast. `token-after-next`: the notebook's: the
    already-shifted targets passed as `labels=`, which GPT2LMHeadModel shifts once more (it drops
    the last position and learns the token after next)."""
    labels = targets if objective == "token-after-next" else None
    with autocast:
        out = model(input_ids=inputs, attention_mask=mask, labels=labels)
    if labels is not None:
        return out.logits, out.loss
    return out.logits, F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())


def mean_last_logits(logits: torch.Tensor, choice: str) -> torch.Tensor:
    """The recorded logits: the batch mean at the last position, in fp32 (the notebook reduced in
    the model's dtype, then cast: `choice`, the config's `train.kernels`, is "notebook")."""
    last = logits[:, -1]
    return last.mean(0).float() if choice == "notebook" else last.float().mean(0)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (the tied matrix counts once): 116,480 for the reference config."""
    return sum(p.numel() for p in model.parameters())


def parameters_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter (name, dtype, shape and bytes, in named order) as training holds
    it: the full-precision state, which the recording's bf16 `W` rows do not show in fp32 and
    bf16-mixed runs (nor the other parameters in any precision)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}:{param.dtype}:{tuple(param.shape)};".encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()
