"""The optimizer and what shapes each update: Adam or AdamW (decoupled weight decay), the learning
rate of each step (`TrainConfig.learning_rate`: linear warm-up, then constant or cosine) and
gradient clipping.

The decay rule is the common GPT recipe's: AdamW decays the 2-D weight matrices (the embeddings,
tied or not, the attention and MLP weights) and not the biases or the layer norms' gains.
"""

from __future__ import annotations

import torch

from runner.config import TrainConfig
from runner.model.kernels import Kernels
from runner.recording.replay import adam_class_and_options


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, kernels: Kernels
                    ) -> tuple[torch.optim.Optimizer, dict]:
    """torch's Adam or AdamW, single-tensor or fused (`kernels.adam`: one kernel per parameter; it
    rounds once per stored value), built as a compact recording's replay builds it
    (`adam_class_and_options`); and what run.json says of it."""
    cls, options = adam_class_and_options(cfg, fused=kernels.adam == "fused")
    if cfg.optimizer == "adam":
        return cls(model.parameters(), **options), {"name": "adam"}
    named = list(model.named_parameters())  # a tied matrix once
    decayed = [name for name, p in named if p.dim() >= 2]
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    description = {"name": "adamw", "weight_decay": cfg.weight_decay,
                   "rule": "decoupled (torch.optim.AdamW): W <- W - lr * weight_decay * W, then Adam's step; "
                           "on the 2-D matrices only",
                   "decayed": decayed, "not_decayed": [name for name, p in named if p.dim() < 2]}
    return cls(groups, **options), description


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / global norm) (torch's clip_grad_norm_, one tensor
    at a time); returns the global norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=False)
