"""bench/packed.py's stacked model computes what N separate GPT2LMHeadModels compute: the packed
measurement times the reference model's own function, not a cheaper one."""

import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import packed  # noqa: E402


def hf_model(p: dict, i: int) -> GPT2LMHeadModel:
    """Model i of the pack as transformers' GPT-2, with its weights copied in."""
    config = GPT2Config(vocab_size=packed.VOCAB, n_positions=packed.CONTEXT, n_embd=packed.WIDTH,
                        n_layer=packed.LAYERS, n_head=packed.HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True)
    model = GPT2LMHeadModel(config).eval()
    names = {"transformer.wte.weight": "wte", "transformer.wpe.weight": "wpe", "transformer.ln_f.weight": "ln_f.w",
             "transformer.ln_f.bias": "ln_f.b"}
    for layer in range(packed.LAYERS):
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            names |= {f"transformer.h.{layer}.{theirs}.weight": f"{layer}.{ours}.w",
                      f"transformer.h.{layer}.{theirs}.bias": f"{layer}.{ours}.b"}
        for ours, theirs in (("qkv", "attn.c_attn"), ("proj", "attn.c_proj"), ("fc", "mlp.c_fc"),
                             ("out", "mlp.c_proj")):
            names |= {f"transformer.h.{layer}.{theirs}.weight": f"{layer}.{ours}.w",
                      f"transformer.h.{layer}.{theirs}.bias": f"{layer}.{ours}.b"}
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(p[names[name]][i])
    return model


def test_the_pack_computes_each_models_loss_and_gradient():
    n = 3
    p = packed.stacked_parameters(n, torch.float32, seed=0)
    with torch.no_grad():  # distinct, non-trivial gains and biases per model
        for name, value in p.items():
            if not name.endswith("w") or "ln" in name:
                value.add_(torch.randn_like(value) * 0.1)
    tokens = torch.randint(0, packed.VOCAB, (n, 2, packed.CONTEXT + 1), generator=torch.Generator().manual_seed(3))
    total = packed.stacked_loss(p, tokens)
    total.backward()
    for i in range(n):
        model = hf_model(p, i)
        logits = model(input_ids=tokens[i, :, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, packed.VOCAB), tokens[i, :, 1:].reshape(-1))
        ours = packed.stacked_loss({k: v[i:i + 1].detach() for k, v in p.items()}, tokens[i:i + 1])
        assert torch.allclose(ours, loss, rtol=1e-5, atol=1e-5), (i, ours, loss)
        loss.backward()
        assert torch.allclose(p["wte"].grad[i], model.transformer.wte.weight.grad, rtol=1e-4, atol=1e-6)
