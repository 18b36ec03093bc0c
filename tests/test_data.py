"""The window sampler: one permutation of every window per epoch, drawn from the seed; any step reachable."""

import itertools

import torch

from runner.data.batches import WindowSampler

CONTEXT, BATCH, SEED = 3, 4, 7


def sampler() -> WindowSampler:
    return WindowSampler(torch.arange(100, 120), CONTEXT, BATCH, SEED)  # 17 windows of 4 tokens: 4 batches per epoch


def starts(inputs: torch.Tensor) -> list[int]:
    return (inputs[:, 0] - 100).tolist()


def test_epochs_are_successive_permutations_of_the_seed():
    s = sampler()
    assert (s.n_windows, s.batches_per_epoch) == (17, 4)
    generator = torch.Generator().manual_seed(SEED)
    permutations = [torch.randperm(17, generator=generator) for _ in range(3)]
    batches = list(itertools.islice(s.batches(), 12))  # three epochs; the 17th window is left out of each
    for step, (inputs, targets) in enumerate(batches, start=1):
        epoch, b = divmod(step - 1, 4)
        assert starts(inputs) == permutations[epoch][b * BATCH:(b + 1) * BATCH].tolist(), step
        assert torch.equal(targets[:, :-1], inputs[:, 1:]) and inputs.shape == (BATCH, CONTEXT)
    first, second = ([start for inputs, _ in batches[e * 4:(e + 1) * 4] for start in starts(inputs)] for e in (0, 1))
    assert len(set(first)) == 16 and len(set(second)) == 16 and first != second


def test_batches_can_start_at_any_step_in_any_epoch():
    s = sampler()
    from_start = list(itertools.islice(s.batches(), 14))
    for first_step in (2, 4, 5, 9, 11):  # inside epoch 1, at the start of epochs 2 and 3, inside epoch 3
        resumed = list(itertools.islice(s.batches(first_step), 14 - first_step + 1))
        for (a_in, a_tg), (b_in, b_tg) in zip(from_start[first_step - 1:], resumed, strict=True):
            assert torch.equal(a_in, b_in) and torch.equal(a_tg, b_tg), first_step
