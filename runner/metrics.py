"""Dead-token analysis of recorded weights: which rows never see their token, and what they do."""

from __future__ import annotations

import torch


@torch.no_grad()
def dead_token_summary(W: torch.Tensor, token_counts: list[int]) -> dict:
    """Dead tokens (never in the corpus) vs live ones: row norms of W and the dead rows' mutual cosine."""
    W = W.detach().float().cpu()
    dead = torch.tensor([c == 0 for c in token_counts])
    norms = W.norm(dim=1)
    summary: dict[str, int | float | None] = {"dead_tokens": int(dead.sum()), "dead_row_norm": None,
                                              "live_row_norm": None, "dead_cosine": None}
    if dead.any():
        summary["dead_row_norm"] = norms[dead].mean().item()
    if (~dead).any():
        summary["live_row_norm"] = norms[~dead].mean().item()
    if dead.sum() >= 2:
        unit = torch.nn.functional.normalize(W[dead], dim=1)
        cosine = unit @ unit.T
        n = len(unit)
        summary["dead_cosine"] = ((cosine.sum() - cosine.diagonal().sum()) / (n * (n - 1))).item()
    return summary
