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

from distmerge.methods.select import keep

Consensus = Literal["sum", "ties"]


def weighted_sum(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i w_i tau_i as a new fp32 tensor.

    Scaling and adding are separate ops (not `add_(tau, alpha=w)`): torch's vectorized add with alpha is a
    fused multiply-add while its scalar tail is not, so results would depend on where chunk and thread
    boundaries fall."""
    total = taus[0] * weights[0]
    for tau, weight in zip(taus[1:], weights[1:], strict=True):
        total.add_(tau if weight == 1.0 else tau * weight)
    return total


def ties_disjoint_mean(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TIES: elect the sign of the weighted sum, then the weighted mean of the agreeing nonzero entries."""
    elected = weighted_sum(taus, weights).sign_()
    numerator = denominator = None
    for tau, weight in zip(taus, weights, strict=True):
        # tau * elected is exact (elected is -1, 0 or 1) and > 0 exactly when tau is nonzero with the elected
        # sign: one comparison instead of three.
        agree = (tau * elected) > 0
        part = keep(agree, tau if weight == 1.0 else tau * weight)
        count = agree if weight == 1.0 else agree * weight
        if numerator is None:
            numerator, denominator = part, count.float()
        else:
            numerator.add_(part)
            denominator.add_(count)
    # Where nothing agrees the numerator is 0 and the result must be 0, not 0 / 0. With positive weights the
    # denominator is 0 exactly there, so dividing by max(denominator, min weight) suffices.
    if min(weights) > 0:
        return numerator.div_(denominator.clamp_min_(min(weights)))
    nothing = denominator == 0  # negative weights can cancel where entries do agree
    return numerator.div_(denominator.masked_fill_(nothing, 1.0)).masked_fill_(nothing, 0.0)


def combine(consensus: Consensus, taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Apply the named consensus."""
    if consensus == "sum":
        return weighted_sum(taus, weights)
    return ties_disjoint_mean(taus, weights)
