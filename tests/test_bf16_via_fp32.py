"""bf16 through fp32 GEMMs (CPUs without a native bf16 GEMM): which runs take it, and that it
computes the same functions as torch's bf16 kernels with only the accumulation's rounding differing."""

import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.pytorch_utils import Conv1D

from runner.config import ModelConfig
from runner.errors import UserError
from runner.model import bf16_via_fp32, kernels
from runner.model.gpt2 import build_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BF16_U = 2.0 ** -8  # bf16's unit roundoff (8-bit significand): round-to-nearest's relative error
FP32_U = 2.0 ** -24
ROWS = 32 * 128  # the reference batch: 32 windows of 128 tokens


def test_choice_table():
    """capability x precision x train.kernels -> kernels: only `fast` in bf16 on a CPU without a
    native bf16 GEMM takes the fp32 path; `hf` and `notebook` keep transformers' kernels everywhere."""
    fallback = {"bf16-true": kernels.Kernels("gelu_pytorch_tanh", kernels.CAUSAL_ATTENTION_FP32, "sigmoid-form",
                                             "single-tensor", "fp32"),
                "bf16-mixed": kernels.Kernels("gelu_pytorch_tanh", kernels.CAUSAL_ATTENTION_FP32, "sigmoid-form",
                                              "fused", "fp32")}
    for precision in ("bf16-true", "bf16-mixed", "fp32"):
        for choice in ("fast", "hf", "notebook"):
            native = kernels.choose(precision, CPU, choice, native_bf16_gemm=True)
            without = kernels.choose(precision, CPU, choice, native_bf16_gemm=False)
            assert native.bf16_gemm == "native"
            if choice == "fast" and precision != "fp32":
                assert without == fallback[precision]
            else:
                assert without == native
            for gemm in (True, False):  # a GPU's bf16 GEMM is its own
                assert kernels.choose(precision, CUDA, choice, native_bf16_gemm=gemm).bf16_gemm == "native"
    # what runs record: unchanged where the path is torch's own, named where it is not
    assert "bf16_gemm" not in kernels.choose("bf16-true", CPU, native_bf16_gemm=True).as_dict()
    assert fallback["bf16-true"].as_dict()["bf16_gemm"] == "fp32"


def test_the_cpu_decides_unless_the_environment_forces_a_path(monkeypatch):
    monkeypatch.delenv(bf16_via_fp32.FORCE_ENV, raising=False)
    assert bf16_via_fp32.cpu_has_native_bf16_gemm() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    for supported in (True, False):
        monkeypatch.setattr(bf16_via_fp32, "cpu_has_native_bf16_gemm", lambda s=supported: s)
        assert bf16_via_fp32.native_bf16_gemm(CPU) is supported
        assert kernels.choose("bf16-true", CPU).bf16_gemm == ("native" if supported else "fp32")
        assert bf16_via_fp32.native_bf16_gemm(CUDA)
        for forced in ("native", "fp32"):
            monkeypatch.setenv(bf16_via_fp32.FORCE_ENV, forced)
            assert kernels.choose("bf16-mixed", CPU).bf16_gemm == forced
            assert kernels.choose("bf16-mixed", CUDA).bf16_gemm == "native"
        monkeypatch.delenv(bf16_via_fp32.FORCE_ENV)
    monkeypatch.setenv(bf16_via_fp32.FORCE_ENV, "fast")
    with pytest.raises(UserError, match="LILGATSBY_BF16_GEMM='fast': expected one of native, fp32"):
        kernels.choose("bf16-true", CPU)


def bf16(*shape, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


def one_rounding_bound(exact: torch.Tensor, magnitude: torch.Tensor, terms: int) -> torch.Tensor:
    """How far a sum of `terms` products, accumulated in fp32 and rounded once to bf16, can be from
    the exact value: fp32's error bound gamma_n * sum |a_i b_i| (`magnitude`), then one rounding."""
    n = terms + 1
    accumulation = n * FP32_U / (1 - n * FP32_U) * magnitude
    return BF16_U * (exact.abs() + accumulation) + accumulation


def assert_within(result: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str):
    excess = (result.double() - exact).abs() - bound
    assert (excess <= 0).all(), f"{what}: {excess.max().item():.3g} beyond the bound"


@pytest.mark.parametrize("n_in, n_out", [(64, 192), (64, 64), (64, 256), (256, 64)])  # GPT-2's Conv1Ds
def test_linear_layers_forward_and_backward(n_in, n_out):
    """Our Conv1D and torch's bf16 one against float64 of the same bf16 values: both within fp32
    accumulation plus one rounding, outputs and every gradient."""
    x, grad_out = bf16(ROWS, n_in, seed=0), bf16(ROWS, n_out, seed=1)
    results = {}
    for cls in (bf16_via_fp32.Fp32Conv1D, Conv1D):
        layer = Conv1D(n_out, n_in).to(torch.bfloat16)
        with torch.no_grad():
            layer.weight.copy_(bf16(n_in, n_out, seed=2, scale=0.1))
            layer.bias.copy_(bf16(n_out, seed=3, scale=0.1))
        layer.__class__ = cls
        x_in = x.clone().requires_grad_()
        out = layer(x_in)
        out.backward(grad_out)
        results[cls] = (out, x_in.grad, layer.weight.grad, layer.bias.grad)
    x64, w64, b64, g64 = (t.double() for t in (x, layer.weight.detach(), layer.bias.detach(), grad_out))
    exact = (x64 @ w64 + b64, g64 @ w64.T, x64.T @ g64, g64.sum(0))
    magnitudes = (x64.abs() @ w64.abs() + b64.abs(), g64.abs() @ w64.abs().T, x64.abs().T @ g64.abs(),
                  g64.abs().sum(0))
    terms = (n_in + 1, n_out, ROWS, ROWS)
    for cls, got in results.items():
        for name, value, want, magnitude, n in zip(("output", "grad x", "grad weight", "grad bias"), got, exact,
                                                   magnitudes, terms, strict=True):
            assert value.dtype == torch.bfloat16
            assert_within(value, want, one_rounding_bound(want, magnitude, n), f"{cls.__name__} {name}")
    ours, theirs = results[bf16_via_fp32.Fp32Conv1D], results[Conv1D]
    assert all((a == b).float().mean() > 0.9 for a, b in zip(ours, theirs, strict=True))  # mostly the same bits


def test_the_tied_unembedding_and_autocast():
    """nn.Linear (the unembedding: x @ W^T) in bf16, and under autocast from fp32 parameters as
    bf16-mixed runs it: autocast's bf16 casts first, then the fp32 product, rounded once."""
    x, grad_out = bf16(ROWS, 64, seed=0), bf16(ROWS, 128, seed=1)
    weight = bf16(128, 64, seed=2, scale=0.1)
    x64, w64, g64 = x.double(), weight.double(), grad_out.double()
    for mixed in (False, True):
        layer = bf16_via_fp32.Fp32Linear(64, 128, bias=False)
        with torch.no_grad():
            layer.weight.copy_(weight)
        if not mixed:
            layer.to(torch.bfloat16)
        x_in = (x.float() if mixed else x).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            out = layer(x_in)
        assert out.dtype == torch.bfloat16
        out.backward(grad_out)
        assert layer.weight.grad.dtype == (torch.float32 if mixed else torch.bfloat16)
        for name, value, want, magnitude, n in (
                ("output", out, x64 @ w64.T, x64.abs() @ w64.abs().T, 64),
                ("grad x", x_in.grad, g64 @ w64, g64.abs() @ w64.abs(), 128),
                ("grad weight", layer.weight.grad, g64.T @ x64, g64.abs().T @ x64.abs(), ROWS)):
            assert_within(value, want, one_rounding_bound(want, magnitude, n), f"mixed={mixed} {name}")


def test_the_mlp_rounds_only_its_output():
    """The MLP in fp32 from bf16 values: closer to float64 than torch's bf16 MLP, which rounds the
    hidden activations twice more; its gradients agree with float64 as closely."""
    config = build_model(ModelConfig(), 0, kernels.HF_DEFAULTS).config
    x, grad_out = bf16(ROWS, 64, seed=0), bf16(ROWS, 64, seed=1)
    reference = GPT2MLP(256, config).double()
    errors = {}
    for cls in (bf16_via_fp32.Fp32Mlp, GPT2MLP):
        mlp = GPT2MLP(256, config)
        mlp.load_state_dict(reference.state_dict())
        mlp.to(torch.bfloat16).__class__ = cls
        x_in = x.clone().requires_grad_()
        out = mlp(x_in)
        out.backward(grad_out)
        x64 = x.double().requires_grad_()
        reference.load_state_dict(mlp.state_dict())  # the same bf16 values, in float64
        reference.zero_grad()
        exact = reference(x64)
        exact.backward(grad_out.double())
        pairs = [(out, exact), (x_in.grad, x64.grad)] + [(p.grad, q.grad) for p, q in zip(
            mlp.parameters(), reference.parameters(), strict=True)]
        errors[cls] = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in pairs]
    ours, theirs = errors[bf16_via_fp32.Fp32Mlp], errors[GPT2MLP]
    assert ours[0] <= BF16_U and ours[0] < theirs[0]  # one rounding of the output
    assert all(e <= BF16_U for e in ours)  # each gradient: one rounding of an fp32 result


def test_attention_in_fp32_rounds_once_and_keeps_its_exact_zeros():
    def qkv():
        g = torch.Generator().manual_seed(0)
        projected = torch.randn(32, 128, 3 * 64, generator=g).to(torch.bfloat16)
        return [t.view(32, 128, 2, 32).transpose(1, 2).requires_grad_() for t in projected.split(64, dim=2)]

    module, scale = torch.nn.Module(), 32 ** -0.5
    grad = bf16(32, 128, 2, 32, seed=1)
    results = {}
    for in_fp32 in (True, False):
        inputs = qkv()
        out, _ = kernels.causal_attention(module, *inputs, None, scaling=scale, in_fp32=in_fp32)
        out.backward(grad)
        results[in_fp32] = (inputs, out)
    (q, k, v), out = results[True]
    exact_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    scores = exact_in[0] @ exact_in[1].transpose(-1, -2) * scale
    probs = scores.masked_fill(torch.ones(128, 128, dtype=torch.bool).triu(1), -torch.inf).softmax(-1)
    exact = (probs @ exact_in[2]).transpose(1, 2)
    exact.backward(grad.double())
    # the output: one rounding of an fp32 result (its second product sums 128 terms; softmax's own
    # fp32 error is a few units of fp32 on each probability)
    magnitude = (probs @ exact_in[2].abs()).transpose(1, 2).detach()
    assert_within(out, exact.detach(), one_rounding_bound(exact.detach(), magnitude, 4 * 128), "output")
    for name, ours, want in zip("qkv", (q.grad, k.grad, v.grad), exact_in, strict=True):
        scale_of = want.grad.abs().amax(dim=(-1, -2), keepdim=True)  # per sequence and head
        excess = (ours.double() - want.grad).abs() - BF16_U * want.grad.abs() - 1e-4 * scale_of
        assert (excess <= 0).all(), f"grad {name}"
    native_error = (results[False][1].double() - exact).abs().max()
    assert (out.double() - exact).abs().max() < native_error  # torch's bf16 rounds scores and probabilities
    # exact zeros above the diagonal: the first position sees only itself, and nothing flows back
    # from earlier outputs to later keys and values
    assert torch.equal(out[:, 0], v[:, :, 0])
    first_inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    first, _ = kernels.causal_attention(module, *first_inputs, None, scaling=scale, in_fp32=True)
    first[:, :64].backward(grad[:, :64])
    assert (first_inputs[1].grad[:, :, 64:] == 0).all() and (first_inputs[2].grad[:, :, 64:] == 0).all()
    assert (first_inputs[0].grad[:, :, 64:] == 0).all() and first_inputs[1].grad[:, :, :64].abs().sum() > 0


def test_models_keep_their_parameters_and_save_as_gpt2(tmp_path):
    """The fp32 path swaps classes only: the same parameters (tie included) and state dict, and a
    saved model loads as a plain GPT2LMHeadModel computing the same function."""
    native = build_model(ModelConfig(), 7, kernels.choose("bf16-true", CPU, native_bf16_gemm=True))
    fp32_path = build_model(ModelConfig(), 7, kernels.choose("bf16-true", CPU, native_bf16_gemm=False))
    assert isinstance(fp32_path.transformer.h[0].mlp, bf16_via_fp32.Fp32Mlp)
    assert isinstance(fp32_path.lm_head, bf16_via_fp32.Fp32Linear)
    assert fp32_path.lm_head.weight is fp32_path.transformer.wte.weight
    want = native.state_dict()
    assert all(torch.equal(t, want[name]) for name, t in fp32_path.state_dict().items())
    assert list(want) == list(fp32_path.state_dict())
    fp32_path.to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert type(loaded.lm_head) is torch.nn.Linear and type(loaded.transformer.h[0].mlp) is GPT2MLP
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = fp32_path.eval()(ids).logits.double(), loaded.eval()(ids).logits.double()
    assert ((ours - theirs).abs().max() / theirs.abs().max()) < 0.05  # bf16 roundings apart
