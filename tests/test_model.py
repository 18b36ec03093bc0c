import resource
import warnings

import pytest
import torch

from runner.config import ModelConfig
from runner.model.gpt2 import build_model, count_parameters, parameters_sha256
from runner.training.host import keep_freed_memory_mapped


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


def test_freed_step_memory_is_reused_without_page_faults():
    """After keep_freed_memory_mapped, a freed 16 MiB buffer (an activation-sized block) is reused
    in place once the heap has settled: allocating and touching it again costs no page faults
    (glibc's adaptive default returns it to the OS and faults its 4,096 pages back in each time)."""
    if keep_freed_memory_mapped() == "default":
        pytest.skip("not glibc")
    faults = []
    for _ in range(16):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(4 << 20)  # 16 MiB, freed at once
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert sum(faults[-8:]) < 4096, faults
