"""Adam's updates of W (and E) replayed from recorded gradients: how a compact recording's W and
moments are recomputed, and how its writer checks, row by row, that they would be.

The replay is torch's own optimizer (the class, options and implementation the training used:
`adam_class_and_options` builds both) stepping a stand-alone copy of one matrix, so it runs the
same kernels in the same dtype; on the CPU it reproduces training's rows bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from runner.config import TrainConfig

TORCH_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32}
WIDTHS = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def adam_class_and_options(cfg: TrainConfig, fused: bool) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """torch's Adam or AdamW with the options training uses: single-tensor or fused, never
    `foreach` (with fp32 parameters its update was seen to differ in the last bit from run to run
    within one process). AdamW's `weight_decay` is set per parameter group by the caller."""
    options: dict[str, Any] = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps, "foreach": False,
                               "fused": fused or None}
    return (torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW), options


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal in every bit (NaN and -0 included), which `torch.equal` on values is not."""
    return a.dtype == b.dtype and torch.equal(a.view(WIDTHS[a.dtype]), b.view(WIDTHS[b.dtype]))


class AdamReplay:
    """One matrix's optimizer state (value, `exp_avg`, `exp_avg_sq`, updates so far), stepped by
    torch's optimizer as training stepped it: `reset` to a known state, then `update` per step."""

    def __init__(self, cfg: TrainConfig, fused: bool, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device | None = None):
        self.cfg, self.fused = cfg, fused
        cls, options = adam_class_and_options(cfg, fused)
        if cfg.optimizer == "adamw":
            options["weight_decay"] = cfg.weight_decay  # W and E are 2-D: in the decayed group
        self.param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.optimizer = cls([self.param], **options)
        self.updates = 0

    def reset(self, value: torch.Tensor, momentum: torch.Tensor, variance: torch.Tensor, updates: int) -> None:
        """The state after `updates` updates (what a row before update `updates + 1` holds)."""
        dtype = self.param.dtype
        with torch.no_grad():
            self.param.copy_(value)
        # where torch's Adam keeps it: on the parameter's device when fused, else on the CPU
        step = torch.tensor(float(updates), dtype=torch.float32, device=self.param.device if self.fused else "cpu")
        self.optimizer.state[self.param] = {"step": step, "exp_avg": momentum.to(dtype).clone(),
                                            "exp_avg_sq": variance.to(dtype).clone()}
        self.updates = updates

    def update(self, grad: torch.Tensor, step: int) -> None:
        """Update `step` (1-based, the training step) with its recorded gradient."""
        assert step == self.updates + 1, f"update {step} after {self.updates}"
        self.param.grad = grad.to(self.param.dtype)
        lr = self.cfg.learning_rate(step) if self.cfg.lr_varies else self.cfg.lr
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.step()
        self.param.grad = None
        self.updates = step

    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(value, momentum, variance) now: views of the replay's own tensors (copy to keep)."""
        state = self.optimizer.state[self.param]
        return self.param.detach(), state["exp_avg"], state["exp_avg_sq"]

    def matches(self, value: torch.Tensor, momentum: torch.Tensor, variance: torch.Tensor) -> bool:
        """Whether the replayed state equals training's in every bit."""
        return all(same_bits(mine, theirs)
                   for mine, theirs in zip(self.state(), (value, momentum, variance), strict=True))
