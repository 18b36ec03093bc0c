"""The fast CPU kernels compute GPT-2's functions: each against transformers' own, then whole
training runs against transformers' eager kernels within the tolerances docs/training.md states."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

from runner.config import ModelConfig
from runner.launch.train import run
from runner.layout import RECORDING
from runner.model import bf16_via_fp32, kernels
from runner.model.gpt2 import build_model

from conftest import load_recording

CPU = torch.device("cpu")
# fast vs transformers' eager kernels over 200 steps (docs/training.md): the largest per-step loss
# difference, its mean, and W's largest relative difference (Frobenius, per step). Measured on this
# suite's small book: bf16-mixed 0.0098 / 0.0012 / 0.5 %, fp32 6.6e-7 / 9.7e-8 / 0.010 %.
BF16_TOLERANCE = (0.05, 0.015, 0.05)
TOLERANCE = {
    "bf16-mixed": BF16_TOLERANCE,
    "bf16-true": BF16_TOLERANCE,  # its fp32-GEMM path (bf16_via_fp32); elsewhere bf16-true's `fast` is eager
    "fp32": (1e-5, 1e-6, 1e-3),
}
HF_EAGER = kernels.Kernels("gelu_pytorch_tanh", "eager", "transformers", "single-tensor")


def qkv(dtype, seed=0):
    """Query, key and value as GPT-2 makes them: views of one projection, heads transposed."""
    g = torch.Generator().manual_seed(seed)
    projected = torch.randn(4, 128, 3 * 64, generator=g).to(dtype)
    return [t.view(4, 128, 2, 32).transpose(1, 2).requires_grad_() for t in projected.split(64, dim=2)]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_causal_attention_equals_eager_forward_and_backward(dtype, tol):
    ours_in, eager_in = qkv(dtype), qkv(dtype)
    mask = torch.full((128, 128), torch.finfo(dtype).min, dtype=dtype).triu(1)
    module = torch.nn.Module()
    ours, _ = kernels.causal_attention(module, *ours_in, None, scaling=32 ** -0.5)
    eager, _ = eager_attention_forward(module, *eager_in, mask, scaling=32 ** -0.5)
    assert ours.shape == eager.shape == (4, 128, 2, 32)
    grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours.backward(grad)
    eager.backward(grad)
    assert torch.allclose(ours.float(), eager.float(), atol=tol, rtol=tol)
    for a, b in zip(ours_in, eager_in, strict=True):
        assert torch.allclose(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)
    # causal: the first position sees only itself, so its output is its value, exactly
    assert torch.equal(ours[:, 0], ours_in[2][:, :, 0])
    # and no position sees the future: changing the last key and value changes only the last output
    changed = [t.detach().clone() for t in ours_in]
    changed[1][:, :, -1] += 1
    changed[2][:, :, -1] += 1
    again, _ = kernels.causal_attention(module, *changed, None, scaling=32 ** -0.5)
    assert torch.equal(again[:, :-1], ours[:, :-1].detach()) and not torch.equal(again[:, -1], ours[:, -1])


def test_causal_attention_hands_other_calls_to_sdpa():
    """A padding mask or a KV cache (generation) is not a training batch: SDPA answers it."""
    fast = build_model(ModelConfig(), 3, kernels.choose("fp32", CPU)).eval()
    hf = build_model(ModelConfig(), 3, kernels.choose("fp32", CPU, "hf")).eval()
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    padded = torch.ones_like(ids)
    padded[0, :5] = 0
    with torch.no_grad():
        assert torch.allclose(fast(ids, attention_mask=padded).logits, hf(ids, attention_mask=padded).logits,
                              atol=1e-5)
        generated = [m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                use_cache=True, pad_token_id=3) for m in (fast, hf)]
    assert torch.equal(*generated)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tanh_gelu_is_gpt2s(dtype):
    x = (torch.randn(8, 128, 256, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    ours_in, theirs_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = kernels.TanhGelu()(ours_in)
    theirs = F.gelu(theirs_in, approximate="tanh")
    exact = F.gelu(x.double(), approximate="tanh")
    # as close to the exact function as torch's own: within one rounding of the output's dtype
    ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=torch.finfo(dtype).tiny)
    assert ((ours.double() - exact).abs() <= ulp + 1e-7).all()
    grad = torch.randn_like(x)
    ours.backward(grad)
    theirs.backward(grad)
    assert torch.equal(ours_in.grad, theirs_in.grad)  # the backward is torch's tanh-GELU derivative


def test_choice_per_precision_and_device():
    """On CPUs with a native bf16 GEMM (test_bf16_via_fp32 covers those without)."""
    def choose(precision, device=CPU, choice="fast"):
        return kernels.choose(precision, device, choice, native_bf16_gemm=True)

    for precision in ("bf16-mixed", "fp32"):
        gelu = "sigmoid-form" if precision == "fp32" else "transformers"
        assert choose(precision) == kernels.Kernels("gelu_pytorch_tanh", kernels.CAUSAL_ATTENTION, gelu, "fused")
        assert choose(precision, torch.device("cuda")) == kernels.Kernels("gelu_pytorch_tanh", "sdpa",
                                                                          "transformers", "fused")
    for precision in ("bf16-true", "bf16-mixed", "fp32"):
        assert choose(precision, CPU, "notebook") == kernels.HF_DEFAULTS
    # bf16-true keeps transformers' kernels and torch's default Adam on bf16 state (docs/training.md)
    assert choose("bf16-true") == choose("bf16-true", CPU, "hf") == HF_EAGER
    assert choose("bf16-true", torch.device("cuda")).adam == "single-tensor"
    assert choose("fp32", CPU, "hf").attention == "sdpa"
    assert choose("fp32", torch.device("mps")).adam == "single-tensor"
    model = build_model(ModelConfig(), 1, choose("fp32"))
    assert all(isinstance(block.mlp.act, kernels.TanhGelu) for block in model.transformer.h)
    assert model.config.activation_function == "gelu_pytorch_tanh"  # what snapshots' config.json names


@pytest.mark.long
@pytest.mark.parametrize("precision, bf16_gemm", [("bf16-mixed", None), ("bf16-true", "fp32"), ("fp32", None)])
def test_fast_kernels_train_like_transformers_eager_ones(make_experiment, tmp_path, monkeypatch, precision,
                                                         bf16_gemm):
    """200 steps with the `fast` kernels and with transformers' eager ones (eager attention, its
    tanh-GELU, torch's default Adam, torch's bf16 GEMM): the same training up to rounding, within
    the stated tolerances on the loss curve and on W at every step. bf16-mixed takes this CPU's
    bf16 GEMM path, bf16-true the fp32 path (forced: bf16_via_fp32) on every CPU, as its `fast` is
    the eager one where the GEMM is native. (Forcing torch's bf16 GEMM where it is slow, or the
    fp32 path twice, would add minutes: test_bf16_via_fp32 covers the paths' products.)"""
    import runner.training.loop

    max_loss, mean_loss, w_rel = TOLERANCE[precision]
    if bf16_gemm:
        monkeypatch.setenv(bf16_via_fp32.FORCE_ENV, bf16_gemm)
    exp = make_experiment(train={"steps": 200, "batch_size": 8, "precision": precision},
                          record={"tensors": ["W", "loss"], "model_steps": "none"})
    run(exp, tmp_path / "fast", progress=False)
    if bf16_gemm:
        assert json.loads((tmp_path / "fast" / "run.json").read_text())["implementation"]["bf16_gemm"] == bf16_gemm
    monkeypatch.setattr(runner.training.loop, "choose", lambda *args: HF_EAGER)
    run(exp, tmp_path / "eager", progress=False)
    fast, eager = (load_recording(tmp_path / name / RECORDING) for name in ("fast", "eager"))
    loss_diff = (fast["loss"] - eager["loss"]).abs()
    assert loss_diff.max() <= max_loss and loss_diff.mean() <= mean_loss
    w_fast, w_eager = fast["W"].float().flatten(1), eager["W"].float().flatten(1)
    assert ((w_fast - w_eager).norm(dim=1) / w_eager.norm(dim=1)).max() <= w_rel
    assert not torch.equal(fast["loss"], eager["loss"])  # the kernels really differ
    assert eager["loss"][-1] < eager["loss"][0] - 1  # and both trained
