"""A model snapshot loads into TransformerLens (the `interp` extra) with the Hugging Face model's logits."""

import os

import pytest
import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from runner.launch.train import run
from runner.training.snapshots import snapshot_dir

try:
    from transformer_lens.model_bridge import TransformerBridge
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs the interp extra
    pytest.skip("transformer-lens is not installed (pip install -e '.[interp]')", allow_module_level=True)


@pytest.mark.parametrize("precision, tied", [("fp32", True), ("bf16-true", True), ("fp32", False)])
def test_snapshot_in_transformer_lens(make_experiment, tmp_path, precision, tied):
    exp = make_experiment(train={"steps": 20, "precision": precision}, model={"tie_embeddings": tied})
    run(exp, tmp_path, progress=False)
    path = snapshot_dir(tmp_path, 20)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    # docs/analysis.md's snippet: TransformerLens's bridge over the snapshot, in fp32
    bridge = TransformerBridge.boot_transformers(str(path), tokenizer=tokenizer, dtype=torch.float32, device="cpu")
    hf = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = tokenizer("In my younger and more vulnerable years", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf(ids).logits
        logits, cache = bridge.run_with_cache(ids)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)  # fp32 rounding, different op order
    # an untied snapshot keeps its two matrices (each as trained), a tied one shares one
    assert torch.equal(hf.lm_head.weight, hf.transformer.wte.weight) is tied
    assert cache["blocks.0.hook_resid_pre"].shape == (1, ids.shape[1], exp.model.hidden_dim)
