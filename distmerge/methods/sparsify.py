"""Sparsifiers: which entries of one task vector survive, and how survivors are rescaled.

Each function takes one fp32 task vector tau (any shape, any device) and returns a new tensor of the same
shape; inputs are never modified. Random sparsifiers take their uniform numbers as an argument (see
`rng.uniform_like`), so they stay pure and the caller decides the seeding.

Tie rules, chosen so results never depend on the device or on sort internals:
- magnitude top-k and the global threshold keep every entry with |tau| >= the threshold, so when the k-th
  largest magnitude is repeated, all copies survive and slightly more than k entries may be kept;
- breadcrumbs and DELLA rank entries with a stable sort, so equal magnitudes are ordered by flat position.
"""

from __future__ import annotations

from typing import Literal

import torch

DareRescale = Literal["inverse_p", "l1"]


def keep_count(density: float, numel: int) -> int:
    """k = round(density * numel), at least 1 when density > 0, at most numel."""
    if density <= 0:
        return 0
    return min(numel, max(1, round(density * numel)))


def keep_above(tau: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Zero every entry with |tau| < threshold; entries equal to the threshold are kept."""
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def kth_largest_magnitude(tau: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest |tau| (1-based), as a 0-d tensor on tau's device."""
    magnitudes = tau.abs().flatten()
    return torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values


def magnitude_topk(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the top round(density * numel) entries by |tau| (ties at the threshold all kept)."""
    k = keep_count(density, tau.numel())
    if k == tau.numel():
        return tau.clone()
    return keep_above(tau, kth_largest_magnitude(tau, k))


def dare_drop(tau: torch.Tensor, density: float, rescale: DareRescale, uniform: torch.Tensor) -> torch.Tensor:
    """DARE: keep each entry where uniform < density, then rescale the survivors.

    `inverse_p` divides survivors by the keep probability (the paper); `l1` scales the kept vector so its
    L1 norm matches the original tau's (mergekit's choice; an all-dropped tensor stays zero).
    """
    keep = uniform < density
    kept = torch.where(keep, tau, torch.zeros_like(tau))
    if rescale == "inverse_p":
        return kept / density
    kept_l1 = kept.abs().sum()
    factor = torch.where(kept_l1 > 0, tau.abs().sum() / kept_l1, torch.zeros_like(kept_l1))
    return kept * factor


def breadcrumbs_band(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model breadcrumbs: drop the top `gamma` fraction by |tau| and the bottom 1 - density - gamma fraction."""
    numel = tau.numel()
    num_top = min(numel, round(gamma * numel))
    num_bottom = min(numel - num_top, max(0, round((1.0 - density - gamma) * numel)))
    order = torch.sort(tau.abs().flatten(), descending=True, stable=True).indices
    keep = torch.zeros(numel, dtype=torch.bool, device=tau.device)
    keep[order[num_top : numel - num_bottom]] = True
    return torch.where(keep.view(tau.shape), tau, torch.zeros_like(tau))


def row_magnitude_ranks(tau: torch.Tensor) -> torch.Tensor:
    """Rank of each entry by |tau| within its row (last dim; rank 0 = smallest), shaped like tau."""
    row_len = tau.shape[-1] if tau.dim() > 0 else 1
    rows = tau.abs().reshape(-1, row_len)
    order = torch.sort(rows, dim=-1, stable=True).indices
    positions = torch.arange(row_len, device=tau.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    return ranks.view(tau.shape)


def della_drop(tau: torch.Tensor, density: float, epsilon: float, uniform: torch.Tensor) -> torch.Tensor:
    """DELLA MagPrune: keep probability p_r = (d - eps) + 2 eps r / (n - 1) by row rank r; survivors / p_r.

    A row of one entry keeps with probability d. Larger magnitudes are kept more often.
    """
    row_len = tau.shape[-1] if tau.dim() > 0 else 1
    if row_len == 1:
        keep_prob = torch.full_like(tau, density)
    else:
        ranks = row_magnitude_ranks(tau).to(torch.float32)
        keep_prob = (density - epsilon) + (2.0 * epsilon / (row_len - 1)) * ranks
    return torch.where(uniform < keep_prob, tau / keep_prob, torch.zeros_like(tau))
