"""Which implementation of GPT-2's functions and of Adam a run uses (`train.kernels`), and the fast
CPU ones: exact causal softmax attention with fewer passes over its scores, tanh-GELU through
sigmoid, and torch's fused Adam. A kernel changes rounding only, never the function
(tests/test_kernels.py bounds the difference over 200 training steps); the choice is recorded in
run.json and in the recording's metadata, because it changes the bits.

Why these are faster on the CPU (docs/speed.md): HF's eager attention makes separate passes for
the scale, the mask and the softmax over the 128 x 128 scores of every head, forward and backward;
here the scale and the mask ride along the QK^T product (`baddbmm`) and the backward is written out.
torch's tanh is slow on the CPU, and sigmoid fast: tanh-GELU is x * sigmoid(2u) for GPT-2's
u = sqrt(2/pi) (x + 0.044715 x^3), the same function as 0.5 x (1 + tanh u).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CAUSAL_ATTENTION = "lilgatsby_causal"


@dataclass(frozen=True)
class Kernels:
    """How a run computes GPT-2's functions and Adam's update (recorded as `implementation`)."""

    activation_function: str  # transformers' name of the GELU, as saved in snapshots' config.json
    attention: str  # transformers' attention implementation (CAUSAL_ATTENTION: ours)
    gelu: str  # "transformers" | "sigmoid-form" (ours)
    adam: str  # "single-tensor" | "fused" (torch.optim.Adam's implementations)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


HF_DEFAULTS = Kernels("gelu_new", "sdpa", "transformers", "single-tensor")  # what GPT2LMHeadModel and Adam do


def choose(precision: str, device: torch.device, choice: str = "fast") -> Kernels:
    """The kernels for `choice`, the config's `train.kernels`. `notebook`: HF's defaults, as 1.12a ran (gelu_new, SDPA).
    `hf`: transformers' own fastest for the precision (eager attention in bf16 on the CPU, where
    SDPA's backward is slow, SDPA otherwise) and torch's default single-tensor Adam: the bits of
    recordings made before the fast kernels. `fast`: the fastest measured (docs/speed.md): ours
    on the CPU and SDPA elsewhere, with the fused Adam where Adam's state is fp32. bf16-true keeps
    `hf`'s: its Adam state is bf16, where the fused update (one rounding instead of one per op)
    measurably changes the training (lower loss, larger live rows after 10,000 steps), and our
    attention is no faster there."""
    if choice == "notebook":
        return HF_DEFAULTS
    cpu = device.type == "cpu"
    if choice == "hf" or precision == "bf16-true":
        bf16_on_cpu = precision in ("bf16-true", "bf16-mixed") and cpu
        return Kernels("gelu_pytorch_tanh", "eager" if bf16_on_cpu else "sdpa", "transformers", "single-tensor")
    if cpu:  # the sigmoid-form GELU computes in fp32: with bf16 activations its casts cost what it saves
        return Kernels("gelu_pytorch_tanh", CAUSAL_ATTENTION, "sigmoid-form" if precision == "fp32" else "transformers",
                       "fused")
    return Kernels("gelu_pytorch_tanh", "sdpa", "transformers", "fused" if device.type == "cuda" else "single-tensor")


def use_kernels(model: torch.nn.Module, kernels: Kernels) -> None:
    """Swap in our GELU (transformers' config names only the function, which stays the same)."""
    if kernels.gelu == "sigmoid-form":
        for block in model.transformer.h:  # type: ignore[union-attr]
            block.mlp.act = TanhGelu()


def adam(params, kernels: Kernels, lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Adam:
    """torch's Adam, single-tensor or fused (one kernel per parameter; it rounds once per stored
    value). Not `foreach`: with fp32 parameters (bf16-mixed) its update was seen to differ in the last
    bit from run to run within one process, depending on what ran before."""
    fused = kernels.adam == "fused"
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=False, fused=fused or None)


class _CausalAttention(torch.autograd.Function):
    """softmax(QK^T * scale + causal mask) V over (batch * heads) sequences, forward and backward
    with one pass per product; the mask is -inf above the diagonal (its probabilities are exactly 0)."""

    @staticmethod
    def forward(ctx, query, key, value, scale: float):
        batch_heads, length = (-1, *query.shape[2:]), query.shape[2]
        q, k, v = (t.reshape(batch_heads) for t in (query, key, value))
        mask = torch.full((length, length), -math.inf, dtype=q.dtype, device=q.device).triu(1)
        probs = torch.softmax(torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale), dim=-1)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale, ctx.shape = scale, query.shape
        return torch.bmm(probs, v).view(query.shape)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        grad_out = grad_out.reshape(q.shape)
        grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
        grad_scores = torch._softmax_backward_data(torch.bmm(grad_out, v.transpose(1, 2)), probs, -1, probs.dtype)
        grad_q = torch.bmm(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q).mul_(ctx.scale)
        return grad_q.view(ctx.shape), grad_k.view(ctx.shape), grad_v.view(ctx.shape), None


def causal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface (query, key, value: batch, heads, length, head dim; returns
    batch, length, heads, head dim). Training batches take our kernel; anything else (a padding
    mask, a KV cache while generating, dropout) goes to SDPA."""
    if attention_mask is not None or query.shape[2] != key.shape[2] or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return _CausalAttention.apply(query, key, value, scale).transpose(1, 2), None


AttentionInterface.register(CAUSAL_ATTENTION, causal_attention)
AttentionMaskInterface.register(CAUSAL_ATTENTION, sdpa_mask)  # None for plain causal batches

_C = math.sqrt(2 / math.pi)


class _TanhGelu(torch.autograd.Function):
    """GPT-2's tanh-GELU computed as x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) in fp32, rounded
    once to the input's dtype; the backward is torch's own tanh-GELU derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        xf = x.float()
        inner = torch.addcmul(torch.full((), 2 * _C, device=x.device), xf, xf, value=2 * _C * 0.044715)
        return inner.mul_(xf).sigmoid_().mul_(xf).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad_out, x, approximate="tanh")


class TanhGelu(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TanhGelu.apply(x)
