import subprocess
import sys
import warnings

import pytest
import torch

from runner.config import ModelConfig
from runner.model.gpt2 import build_model, count_parameters, parameters_sha256


def test_reference_model_shape_and_tying():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers must not warn about the config
        model = build_model(ModelConfig(), seed=42)
    assert count_parameters(model) == 116_480
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.shape == (128, 64)
    assert model.config.n_positions == 128 and model.config.n_layer == 2 and model.config.n_head == 2
    assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (0, 0, 0)


def test_initialisation_depends_only_on_seed():
    a, b, c = (build_model(ModelConfig(), seed) for seed in (1, 1, 2))
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_parameters_fingerprint_sees_one_bit_of_any_parameter():
    a, b = build_model(ModelConfig(), seed=1), build_model(ModelConfig(), seed=1)
    assert parameters_sha256(a) == parameters_sha256(b)
    with torch.no_grad():  # the last bit of one value of the last layer norm, below bf16's precision
        bits = b.transformer.ln_f.bias.view(torch.int32)
        bits[7] ^= 1
    assert parameters_sha256(a) != parameters_sha256(b)


_STEP_FAULTS = """
import resource, sys, torch
from runner.config import ModelConfig
from runner.model.gpt2 import build_model
from runner.training.host import keep_freed_memory_mapped
if sys.argv[1] == "keep" and keep_freed_memory_mapped() == "default":
    sys.exit(3)
torch.set_num_threads(1)
model = build_model(ModelConfig(), seed=1)
optimizer = torch.optim.Adam(model.parameters())
tokens = torch.randint(0, 128, (32, 128), generator=torch.Generator().manual_seed(0))
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
print(*faults)
"""


def _settled_step_faults(setting: str) -> list[int]:
    """Page faults of this thread in each of 32 reference-sized training steps after eight to settle,
    in a fresh process: mallopt is process-wide and the heap's state depends on what ran before."""
    done = subprocess.run([sys.executable, "-c", _STEP_FAULTS, setting], capture_output=True, text=True)
    if done.returncode == 3:
        pytest.skip("not glibc")
    assert done.returncode == 0, done.stderr
    return [int(n) for n in done.stdout.split()][8:]


@pytest.mark.long  # a bound on the kernel's page faults: timing-free, but noisy on a loaded machine
def test_freed_step_memory_is_reused_without_page_faults():
    """With keep_freed_memory_mapped, a training step reuses the memory the previous one freed;
    glibc's adaptive default trims the heap after most steps and faults it back in (thousands per
    step). Kept, a step now and then still grows the heap (~1,000 faults), and kernels that balance
    NUMA memory add hinting faults at random: so the typical step (the median) and the total."""
    default, kept = _settled_step_faults("default"), _settled_step_faults("keep")
    assert sorted(kept)[len(kept) // 2] < 64 and sum(kept) * 8 < sum(default), f"kept: {kept}; default: {default}"
