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

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from runner.model import bf16_via_fp32

CAUSAL_ATTENTION = "lilgatsby_causal"
CAUSAL_ATTENTION_FP32 = "lilgatsby_causal_fp32"  # the same, computed in fp32 from bf16 inputs


@dataclass(frozen=True)
class Kernels:
    """How a run computes GPT-2's functions and Adam's update (recorded as `implementation`)."""

    activation_function: str  # transformers' name of the GELU, as saved in snapshots' config.json
    attention: str  # transformers' attention implementation (CAUSAL_ATTENTION: ours)
    gelu: str  # "transformers" | "sigmoid-form" (ours)
    adam: str  # "single-tensor" | "fused" (torch.optim.Adam's implementations)
    bf16_gemm: str = "native"  # "native" (torch's) | "fp32" (bf16 computed through fp32 GEMMs: bf16_via_fp32)

    def as_dict(self) -> dict[str, str]:
        """What the run records; bf16_gemm only where it is "fp32", so that the implementation (and
        so the recording's header) of every run that does not take that path stays as it was."""
        chosen = asdict(self)
        if self.bf16_gemm == "native":
            del chosen["bf16_gemm"]
        return chosen


HF_DEFAULTS = Kernels("gelu_new", "sdpa", "transformers", "single-tensor")  # what GPT2LMHeadModel and Adam do


def choose(precision: str, device: torch.device, choice: str = "fast", native_bf16_gemm: bool | None = None
           ) -> Kernels:
    """The kernels for `choice`, the config's `train.kernels`. `notebook`: HF's defaults, as 1.12a ran (gelu_new, SDPA).
    `hf`: transformers' own fastest for the precision (eager attention in bf16 on the CPU, where
    SDPA's backward is slow, SDPA otherwise) and torch's default single-tensor Adam: the bits of
    recordings made before the fast kernels. `fast`: the fastest measured (docs/speed.md): ours
    on the CPU and SDPA elsewhere, with the fused Adam where Adam's state is fp32. bf16-true keeps
    `hf`'s: its Adam state is bf16, where the fused update (one rounding instead of one per op)
    measurably changes the training (lower loss, larger live rows after 10,000 steps), and our
    attention is no faster there. On a CPU without a native bf16 GEMM (`native_bf16_gemm`, by
    default bf16_via_fp32's rule), `fast` in bf16 computes every product through fp32 GEMMs instead:
    torch's bf16 fallback is ~30x slower, and `hf` and `notebook` pay that to keep their bits."""
    if choice == "notebook":
        return HF_DEFAULTS
    cpu = device.type == "cpu"
    bf16 = precision in ("bf16-true", "bf16-mixed")
    if choice == "fast" and bf16 and cpu and not (
            bf16_via_fp32.native_bf16_gemm(device) if native_bf16_gemm is None else native_bf16_gemm):
        adam = "single-tensor" if precision == "bf16-true" else "fused"
        return Kernels("gelu_pytorch_tanh", CAUSAL_ATTENTION_FP32, "sigmoid-form", adam, "fp32")
    if choice == "hf" or precision == "bf16-true":
        return Kernels("gelu_pytorch_tanh", "eager" if bf16 and cpu else "sdpa", "transformers", "single-tensor")
    if cpu:  # the sigmoid-form GELU computes in fp32: with bf16 activations its casts cost what it saves
        return Kernels("gelu_pytorch_tanh", CAUSAL_ATTENTION, "sigmoid-form" if precision == "fp32" else "transformers",
                       "fused")
    return Kernels("gelu_pytorch_tanh", "sdpa", "transformers", "fused" if device.type == "cuda" else "single-tensor")


def use_kernels(model: torch.nn.Module, kernels: Kernels) -> None:
    """Swap in our GELU and fp32-GEMM products (transformers' config names only the function, which
    stays the same)."""
    if kernels.bf16_gemm == "fp32":
        bf16_via_fp32.compute_in_fp32(model)
    if kernels.gelu == "sigmoid-form":
        for block in model.transformer.h:  # type: ignore[union-attr]
            block.mlp.act = TanhGelu()


class _CausalAttention(torch.autograd.Function):
    """softmax(QK^T * scale + causal mask) V over (batch * heads) sequences, forward and backward
    with one pass per product; the mask is -inf above the diagonal (its probabilities are exactly 0).
    With `in_fp32` (bf16 inputs on a CPU without a native bf16 GEMM: bf16_via_fp32), it computes in
    fp32 from the bf16 values and rounds its output and its gradients once to bf16: the scores and
    probabilities never round-trip through bf16 (each round trip is a pass over B x H x T x T)."""

    @staticmethod
    def forward(ctx, query, key, value, scale: float, in_fp32: bool):
        dtype, shape = query.dtype, query.shape
        batch_heads, length = (-1, *shape[2:]), shape[2]
        q, k, v = (t.reshape(batch_heads).to(torch.float32 if in_fp32 else dtype) for t in (query, key, value))
        with torch.autocast("cpu", enabled=False) if in_fp32 else contextlib.nullcontext():
            mask = torch.full((length, length), -math.inf, dtype=q.dtype, device=q.device).triu(1)
            probs = torch.softmax(torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale), dim=-1)
            out = torch.bmm(probs, v)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale, ctx.shape, ctx.dtype = scale, shape, dtype
        return out.to(dtype).view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        grad_out = grad_out.reshape(q.shape).to(q.dtype)
        grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
        grad_scores = torch._softmax_backward_data(torch.bmm(grad_out, v.transpose(1, 2)), probs, -1, probs.dtype)
        grad_q = torch.bmm(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q).mul_(ctx.scale)
        return (*(g.to(ctx.dtype).view(ctx.shape) for g in (grad_q, grad_k, grad_v)), None, None)


def causal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, in_fp32=False, **kwargs):
    """transformers' attention interface (query, key, value: batch, heads, length, head dim; returns
    batch, length, heads, head dim). Training batches take our kernel; anything else (a padding
    mask, a KV cache while generating, dropout) goes to SDPA."""
    if attention_mask is not None or query.shape[2] != key.shape[2] or (dropout and module.training):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return _CausalAttention.apply(query, key, value, scale, in_fp32).transpose(1, 2), None


def causal_attention_in_fp32(module, query, key, value, attention_mask, **kwargs):
    return causal_attention(module, query, key, value, attention_mask, in_fp32=True, **kwargs)


for _name, _attention in ((CAUSAL_ATTENTION, causal_attention), (CAUSAL_ATTENTION_FP32, causal_attention_in_fp32)):
    AttentionInterface.register(_name, _attention)
    AttentionMaskInterface.register(_name, sdpa_mask)  # None for plain causal batches


class _TanhGelu(torch.autograd.Function):
    """GPT-2's tanh-GELU computed as x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)) in fp32, rounded
    once to the input's dtype; the backward is torch's own tanh-GELU derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return bf16_via_fp32.tanh_gelu(x.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad_out, x, approximate="tanh")


class TanhGelu(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TanhGelu.apply(x)
