"""The optimizer and what shapes each update: Adam or AdamW (decoupled weight decay), the learning
rate of each step (`TrainConfig.learning_rate`: linear warm-up, then constant or cosine) and
gradient clipping.

The decay rule is the common GPT recipe's: AdamW decays the 2-D weight matrices (the embeddings,
tied or not, the attention and MLP weights) and not the biases or the layer norms' gains.
"""

from __future__ import annotations

from typing import Any

import torch

from runner.config import TrainConfig
from runner.model.kernels import Kernels


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, kernels: Kernels
                    ) -> tuple[torch.optim.Optimizer, dict]:
    """torch's Adam or AdamW, single-tensor or fused (`kernels.adam`: one kernel per parameter; it
    rounds once per stored value); and what run.json says of it. Not `foreach`: with fp32
    parameters (bf16-mixed) its update was seen to differ in the last bit from run to run within
    one process, depending on what ran before."""
    options: dict[str, Any] = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps, "foreach": False,
                               "fused": kernels.adam == "fused" or None}
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), **options), {"name": "adam"}
    named = list(model.named_parameters())  # a tied matrix once
    decayed = [name for name, p in named if p.dim() >= 2]
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    description = {"name": "adamw", "weight_decay": cfg.weight_decay,
                   "rule": "decoupled (torch.optim.AdamW): W <- W - lr * weight_decay * W, then Adam's step; "
                           "on the 2-D matrices only",
                   "decayed": decayed, "not_decayed": [name for name, p in named if p.dim() < 2]}
    return torch.optim.AdamW(groups, **options), description


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / global norm) (torch's clip_grad_norm_, one tensor
    at a time); returns the global norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=False)
