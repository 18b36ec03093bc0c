"""Training batches: which windows of the encoded corpus each step trains on (`train.batch_order`)."""

from __future__ import annotations

import torch

from runner.errors import ConfigError


def check_enough_text(n_tokens: int, batch_order: str, context_length: int, batch_size: int) -> None:
    """The corpus holds what the batch order needs: one batch of windows of context_length + 1
    tokens (the notebook's order keeps a partial batch, so one window). Checked before a run
    writes anything (the ASCII tokenizer makes one token of each character)."""
    needed = 1 if batch_order == "notebook" else batch_size
    if n_tokens - context_length < needed:
        raise ConfigError(f"corpus: {n_tokens:,} tokens, too few for {needed} window{'s' * (needed > 1)} of "
                          f"model.context_length + 1 = {context_length + 1} tokens (train.batch_order: "
                          f"{batch_order}, train.batch_size: {batch_size})")


class _Windows:
    """The training examples: the windows of context_length + 1 tokens at every offset."""

    ORDER: str  # train.batch_order

    def __init__(self, tokens: torch.Tensor, context_length: int, batch_size: int, seed: int):
        check_enough_text(len(tokens), self.ORDER, context_length, batch_size)
        self.tokens, self.batch_size, self.seed = tokens, batch_size, seed
        self.n_windows = len(tokens) - context_length
        self.offsets = torch.arange(context_length + 1)

    def _batch(self, order: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch b of a window order as (inputs, targets), with one gather."""
        windows = self.tokens[order[b * self.batch_size:(b + 1) * self.batch_size, None] + self.offsets]
        return windows[:, :-1], windows[:, 1:]


class WindowSampler(_Windows):
    """Windows shuffled without replacement each epoch (like `DataLoader(shuffle=True,
    drop_last=True)`), as a pure function of the seed: epoch e uses the e-th permutation drawn from
    a generator seeded with the run seed."""

    ORDER = "epochs"

    def __init__(self, tokens: torch.Tensor, context_length: int, batch_size: int, seed: int):
        super().__init__(tokens, context_length, batch_size, seed)
        self.batches_per_epoch = self.n_windows // batch_size

    def batches(self, first_step: int = 1):
        """Yield (inputs, targets) for steps first_step, first_step + 1, ... (step 1 is the first batch)."""
        generator = torch.Generator().manual_seed(self.seed)
        epoch, position = divmod(first_step - 1, self.batches_per_epoch)
        for _ in range(epoch + 1):
            order = torch.randperm(self.n_windows, generator=generator)
        while True:
            for b in range(position, self.batches_per_epoch):
                yield self._batch(order, b)
            order, position = torch.randperm(self.n_windows, generator=generator), 0


class NotebookSampler(_Windows):
    """The notebook's batch order, reproduced with gathers instead of a per-item DataLoader:
    `DataLoader(windows, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))`.

    Every DataLoader iterator draws a base seed from that generator as it is created, and its
    RandomSampler draws `randperm(n)` from it at the first batch and once more (discarded) as the
    epoch runs out; the last partial batch is kept. The notebook drew one iterator for the dummy
    batch of row 0, then one for training and a new one at every epoch."""

    ORDER = "notebook"

    def __init__(self, tokens: torch.Tensor, context_length: int, batch_size: int, seed: int):
        super().__init__(tokens, context_length, batch_size, seed)
        self.batches_per_epoch = -(-self.n_windows // batch_size)

    def _new_iterator(self, generator: torch.Generator) -> torch.Tensor:
        """What creating a DataLoader iterator and taking its first batch draws: the window order."""
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the iterator's base seed
        return torch.randperm(self.n_windows, generator=generator)

    def dummy_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch the notebook's row 0 logits come from: the first batch of the first iterator."""
        return self._batch(self._new_iterator(torch.Generator().manual_seed(self.seed)), 0)

    def batches(self, first_step: int = 1):
        """Yield (inputs, targets) for steps first_step, first_step + 1, ... (step 1 is the first batch)."""
        generator = torch.Generator().manual_seed(self.seed)
        self._new_iterator(generator)  # the dummy batch's iterator
        epoch, position = divmod(first_step - 1, self.batches_per_epoch)
        for e in range(epoch + 1):
            if e:
                torch.randperm(self.n_windows, generator=generator)  # the exhausted sampler's last draw
            order = self._new_iterator(generator)
        while True:
            for b in range(position, self.batches_per_epoch):
                yield self._batch(order, b)
            torch.randperm(self.n_windows, generator=generator)
            order, position = self._new_iterator(generator), 0


def make_sampler(batch_order: str, tokens: torch.Tensor, context_length: int, batch_size: int, seed: int
                 ) -> WindowSampler | NotebookSampler:
    sampler = NotebookSampler if batch_order == "notebook" else WindowSampler
    return sampler(tokens, context_length, batch_size, seed)
