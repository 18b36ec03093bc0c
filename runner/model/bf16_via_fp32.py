"""bf16 training computed through torch's fp32 GEMM, on CPUs without a native bf16 GEMM.

torch multiplies bf16 matrices fast on the CPU only where oneDNN supports bf16 (AVX-512 BW/VL/DQ,
AMX, Arm's bf16); elsewhere (AVX2-only CPUs: AMD before Zen 4, most Intel desktops) it falls back
to a scalar loop, ~30x slower than an fp32 GEMM (docs/speed.md). There the bf16 model's products
run as fp32 GEMMs of the exactly representable fp32 copies of their bf16 operands, and the result
is rounded once to bf16: a native bf16 GEMM also accumulates in fp32, so only roundings differ.
Converting between bf16 and fp32 is then the largest cost left, so each block converts at its
edges only: a linear layer (GPT-2's Conv1D, the tied unembedding) rounds its output once; the
MLP (c_fc, tanh-GELU, c_proj) and attention (`kernels._CausalAttention` with `in_fp32`) compute
in fp32 from their bf16 inputs and weights and round their outputs once, so their inner
activations are not rounded to bf16 on the way. Gradients are rounded once the same way.

Which path a run takes follows from the CPU (`native_bf16_gemm`), never from a timing, so the bits
of a run do not depend on the machine's load; LILGATSBY_BF16_GEMM=native|fp32 forces either path
on any machine (tests, benchmarks), and the run records the choice (`implementation.bf16_gemm`).
"""

from __future__ import annotations

import math

import torch
from torch.amp import custom_bwd, custom_fwd
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.pytorch_utils import Conv1D

from runner.settings import BF16_GEMM, bf16_gemm

FORCE_ENV = BF16_GEMM
_C = math.sqrt(2 / math.pi)


def native_bf16_gemm(device: torch.device) -> bool:
    """Whether bf16 products on `device` use torch's own bf16 GEMM: everywhere but on CPUs where
    oneDNN has no bf16 GEMM (the check torch's own compiler makes), unless LILGATSBY_BF16_GEMM
    forces a path."""
    forced = bf16_gemm()
    if forced:
        return forced == "native"
    return device.type != "cpu" or cpu_has_native_bf16_gemm()


def cpu_has_native_bf16_gemm() -> bool:
    """torch's own check: oneDNN supports bf16 on this CPU (torch without oneDNN has none)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def tanh_gelu(xf: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh-GELU as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the same function as
    0.5 x (1 + tanh u); torch's tanh is slow on the CPU and its sigmoid fast. fp32 in, fp32 out."""
    inner = torch.addcmul(torch.full((), 2 * _C, device=xf.device), xf, xf, value=2 * _C * 0.044715)
    return inner.mul_(xf).sigmoid_().mul_(xf)


def _dtypes(*tensors: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else t.dtype for t in tensors)


def _rounded(grads: tuple, dtypes: tuple, needed: tuple) -> tuple:
    """Each gradient rounded once to its input's dtype; None where autograd needs none."""
    return tuple(g.to(dtype) if dtype is not None and n else None for g, dtype, n in zip(grads, dtypes, needed,
                                                                                           strict=True))


class _Linear(torch.autograd.Function):
    """bias + x @ weight (x: rows x in, weight: in x out) as one fp32 GEMM of bf16 values, rounded
    once. Under autocast its inputs are first cast to bf16, as autocast casts a native addmm's."""

    @staticmethod
    @custom_fwd(device_type="cpu", cast_inputs=torch.bfloat16)
    def forward(ctx, x, weight, bias):
        x32, w32 = x.float(), weight.float()
        ctx.save_for_backward(x32, w32)
        ctx.dtypes = _dtypes(x, weight, bias)
        product = torch.mm(x32, w32) if bias is None else torch.addmm(bias.float(), x32, w32)
        return product.to(x.dtype)

    @staticmethod
    @custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        x32, w32 = ctx.saved_tensors
        g32 = grad_out.float()
        grads = (torch.mm(g32, w32.t()), torch.mm(x32.t(), g32), g32.sum(0))
        return _rounded(grads, ctx.dtypes, ctx.needs_input_grad)


class _Mlp(torch.autograd.Function):
    """GPT-2's MLP, c_proj(gelu(c_fc(x))), in fp32 from bf16 x and weights, its output rounded once."""

    @staticmethod
    @custom_fwd(device_type="cpu", cast_inputs=torch.bfloat16)
    def forward(ctx, x, w_fc, b_fc, w_proj, b_proj):
        x32, wf32, wp32 = x.float(), w_fc.float(), w_proj.float()
        pre = torch.addmm(b_fc.float(), x32, wf32)
        act = tanh_gelu(pre)
        ctx.save_for_backward(x32, wf32, wp32, pre, act)
        ctx.dtypes = _dtypes(x, w_fc, b_fc, w_proj, b_proj)
        return torch.addmm(b_proj.float(), act, wp32).to(x.dtype)

    @staticmethod
    @custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        x32, wf32, wp32, pre, act = ctx.saved_tensors
        g32 = grad_out.float()
        grad_pre = torch.ops.aten.gelu_backward(torch.mm(g32, wp32.t()), pre, approximate="tanh")
        grads = (torch.mm(grad_pre, wf32.t()), torch.mm(x32.t(), grad_pre), grad_pre.sum(0),
                 torch.mm(act.t(), g32), g32.sum(0))
        return _rounded(grads, ctx.dtypes, ctx.needs_input_grad)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class Fp32Conv1D(Conv1D):
    """GPT-2's Conv1D (x @ weight + bias, weight: in x out), its product through the fp32 GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Linear.apply(_rows(x), self.weight, self.bias).view(*x.shape[:-1], self.nf)


class Fp32Linear(torch.nn.Linear):
    """nn.Linear (x @ weight^T + bias), its product through the fp32 GEMM: the tied unembedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Linear.apply(_rows(x), self.weight.t(), self.bias).view(*x.shape[:-1], self.out_features)


class Fp32Mlp(GPT2MLP):
    """GPT2MLP computed in fp32 (`_Mlp`); its modules and parameters stay GPT2MLP's."""

    # (transformers annotates GPT2MLP's argument as a tuple; GPT2Block passes a tensor)
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        c_fc, c_proj = self.c_fc, self.c_proj
        out = _Mlp.apply(_rows(hidden_states), c_fc.weight, c_fc.bias, c_proj.weight, c_proj.bias)
        return self.dropout(out.view(*hidden_states.shape[:-1], c_proj.nf))


_FP32_CLASSES = {Conv1D: Fp32Conv1D, torch.nn.Linear: Fp32Linear, GPT2MLP: Fp32Mlp}


def compute_in_fp32(model: torch.nn.Module) -> None:
    """Route the MLPs, the other Conv1Ds and the unembedding through fp32 GEMMs. The modules keep
    their parameters (the tie included), their order and their state-dict names: only their class,
    and so their forward, changes (snapshots save and load as plain GPT2LMHeadModel)."""
    for module in model.modules():
        if type(module) in _FP32_CLASSES:
            module.__class__ = _FP32_CLASSES[type(module)]
