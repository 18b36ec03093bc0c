"""Training batches: which windows of the encoded corpus each step trains on."""

from __future__ import annotations

import torch


class WindowSampler:
    """Training windows of context_length + 1 tokens at every offset, shuffled without replacement
    each epoch (like `DataLoader(shuffle=True, drop_last=True)`), as a pure function of the seed:
    epoch e uses the e-th permutation drawn from a generator seeded with the run seed."""

    def __init__(self, tokens: torch.Tensor, context_length: int, batch_size: int, seed: int):
        self.tokens, self.batch_size, self.seed = tokens, batch_size, seed
        self.n_windows = len(tokens) - context_length
        if self.n_windows < batch_size:
            raise ValueError(f"corpus has {len(tokens)} tokens: too few for batches of {batch_size} windows "
                             f"of {context_length + 1} tokens")
        self.batches_per_epoch = self.n_windows // batch_size
        self.offsets = torch.arange(context_length + 1)

    def batches(self, first_step: int = 1):
        """Yield (inputs, targets) for steps first_step, first_step + 1, ... (step 1 is the first batch)."""
        generator = torch.Generator().manual_seed(self.seed)
        epoch, position = divmod(first_step - 1, self.batches_per_epoch)
        for _ in range(epoch + 1):
            order = torch.randperm(self.n_windows, generator=generator)
        while True:
            for b in range(position, self.batches_per_epoch):
                starts = order[b * self.batch_size:(b + 1) * self.batch_size]
                windows = self.tokens[starts[:, None] + self.offsets]  # (batch, context + 1), one gather
                yield windows[:, :-1], windows[:, 1:]
            order, position = torch.randperm(self.n_windows, generator=generator), 0
