"""Consensus: how sparsified task vectors are combined into one delta.

- `sum`: the weighted sum sum_i w_i tau_i (task arithmetic, dare_linear, breadcrumbs, della_linear).
- `ties`: TIES sign election and disjoint mean. The elected sign is gamma = sgn(sum_i w_i tau_i); an entry of
  tau_i contributes when it is nonzero and its sign equals gamma; the result is
  sum_agree w_i tau_i / sum_agree w_i, and 0 where nothing agrees (or gamma is 0).

Both accumulate model by model instead of stacking, so peak memory stays at a few copies of one tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Consensus = Literal["sum", "ties"]


def weighted_sum(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i tau_i as a new fp32 tensor."""
    total = torch.zeros_like(taus[0], dtype=torch.float32)
    for tau, weight in zip(taus, weights, strict=True):
        total.add_(tau, alpha=weight)
    return total


def ties_disjoint_mean(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES: elect the sign of the weighted sum, then the weighted mean of the agreeing nonzero entries."""
    elected = torch.sign(weighted_sum(taus, weights))
    numerator = torch.zeros_like(elected)
    denominator = torch.zeros_like(elected)
    for tau, weight in zip(taus, weights, strict=True):
        agree = (tau != 0) & (torch.sign(tau) == elected)
        numerator.add_(torch.where(agree, tau, torch.zeros_like(tau)), alpha=weight)
        denominator.add_(agree.to(denominator.dtype), alpha=weight)
    has_agreement = denominator != 0
    safe = torch.where(has_agreement, denominator, torch.ones_like(denominator))
    return torch.where(has_agreement, numerator / safe, torch.zeros_like(numerator))


def combine(consensus: Consensus, taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Apply the named consensus."""
    if consensus == "sum":
        return weighted_sum(taus, weights)
    return ties_disjoint_mean(taus, weights)
