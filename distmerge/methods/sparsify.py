"""Sparsifiers: which entries of one task vector survive, and how survivors are rescaled.

Each function takes one fp32 task vector tau (any shape, any device) and returns a new tensor of the same
shape; inputs are never modified. Random sparsifiers take their uniform numbers as an argument (see
`rng.uniform_like`), so they stay pure and the caller decides the seeding. Quantities over the whole tensor
(a top-k threshold, band bounds, an L1 norm) are computed here for a whole tensor, or passed in when the
executor merges a large tensor in row chunks and computed them over all chunks (`radix`, `exact`).

Tie rules, chosen so results never depend on the device, on sort internals or on how a tensor is chunked:
- magnitude top-k and the global threshold keep every entry with |tau| >= the threshold, so when the k-th
  largest magnitude is repeated, all copies survive and slightly more than k entries may be kept;
- breadcrumbs and DELLA rank entries as a stable sort would, so equal magnitudes are ordered by flat position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from distmerge.methods import cpu_kernels, exact
from distmerge.methods.radix import OrderStatistic, tensor_order_statistics
from distmerge.methods.select import keep

DareRescale = Literal["inverse_p", "l1"]


def keep_count(density: float, numel: int) -> int:
    """k = round(density * numel), at least 1 when density > 0, at most numel."""
    if density <= 0:
        return 0
    return min(numel, max(1, round(density * numel)))


def keep_above(tau: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Zero every entry with |tau| < threshold; entries equal to it are kept."""
    if not isinstance(threshold, torch.Tensor) and cpu_kernels.enabled(tau):
        return cpu_kernels.keep_at_least(tau, threshold)
    return keep(tau.abs() >= threshold, tau)


def magnitude_topk(tau: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """TIES trim: keep the top round(density * numel) entries by |tau| (ties at the threshold all kept).

    `threshold`: the k-th largest |tau| when the caller computed it over the whole tensor (chunked merges).
    """
    threshold = magnitude_topk_threshold(tau, density, threshold)
    return tau.clone() if threshold is None else keep_above(tau, threshold)


def magnitude_topk_threshold(tau: torch.Tensor, density: float, threshold: float | None = None) -> float | None:
    """The |tau| at or above which magnitude_topk keeps entries; None when it keeps them all."""
    if threshold is not None:
        return threshold
    k = keep_count(density, tau.numel())
    if k == tau.numel():
        return None
    return tensor_order_statistics(tau, [k - 1])[0].value


def dare_keep(tau: torch.Tensor, density: float, uniform: torch.Tensor) -> torch.Tensor:
    """DARE's drop: entries where uniform < density survive, unscaled."""
    return keep(uniform < density, tau)


def l1_rescale_factor(tau_l1: float, kept_l1: float) -> float:
    """||tau||_1 / ||kept||_1, 0 when nothing was kept (an all-dropped tensor stays zero)."""
    return tau_l1 / kept_l1 if kept_l1 > 0 else 0.0


def dare_l1_partials(tau: torch.Tensor, density: float, uniform: torch.Tensor) -> torch.Tensor:
    """Exact L1 partials of tau and of its DARE survivors ([2, 256], see `exact`)."""
    return exact.abs_sum_partial(tau, uniform < density)


def dare_drop(tau: torch.Tensor, density: float, rescale: DareRescale, uniform: torch.Tensor,
              l1_factor: float | None = None) -> torch.Tensor:
    """DARE: keep each entry where uniform < density, then rescale the survivors.

    `inverse_p` divides survivors by the keep probability (the paper); `l1` scales the kept vector so its
    L1 norm matches the original tau's (mergekit's choice). Both norms are exact sums (`exact`), so the
    factor does not depend on chunking or threads; `l1_factor` passes it in for a chunk of a large tensor.
    On CPU the merge applies this drop inside `cpu_kernels.combine` instead (the same bits).
    """
    if rescale == "l1" and l1_factor is None:
        l1_factor = l1_rescale_factor(*map(exact.partial_value, dare_l1_partials(tau, density, uniform)))
    kept = dare_keep(tau, density, uniform)
    if rescale == "inverse_p":
        return exact.divide_(kept, density)
    return kept.mul_(l1_factor)


def band_ranks(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs keeps descending magnitude ranks [first, stop): the top gamma fraction and the bottom
    1 - density - gamma fraction are dropped."""
    num_top = min(numel, round(gamma * numel))
    num_bottom = min(numel - num_top, max(0, round((1.0 - density - gamma) * numel)))
    return num_top, numel - num_bottom


@dataclass(frozen=True)
class BandPlan:
    """What breadcrumbs keeps of one task vector (or a row chunk of one): bottom <= |tau| <= top, except that of
    the entries whose |tau| is an edge's value, only those numbered (in flat order over the piece) in the
    edge's [low, high) are kept."""

    top: float
    bottom: float
    edges: tuple[tuple[float, int, int], ...] = ()


KEEP_NOTHING = BandPlan(-math.inf, math.inf)


def band_plan(first: int, stop: int, bounds: tuple[OrderStatistic, OrderStatistic],
              equal_before: tuple[int, int] = (0, 0)) -> BandPlan:
    """The plan that keeps descending ranks [first, stop) (`band_ranks`, first < stop), from the order
    statistics at ranks first and stop - 1 and how many entries equal to each precede the piece."""
    top, bottom = bounds
    distinct = [(top, equal_before[0])] + ([(bottom, equal_before[1])] if bottom.value != top.value else [])
    edges = []
    for bound, before in distinct:
        if bound.value == 0.0:
            continue  # zeros contribute nothing, kept or dropped: no tie to break
        # The equal entries have ranks bound.greater + before + (their index among the equal ones here):
        # those outside [first, stop) are dropped.
        low, high = first - bound.greater - before, stop - bound.greater - before
        if low <= 0 and high >= bound.equal - before:
            continue  # every equal entry here is inside the band
        edges.append((bound.value, low, high))
    return BandPlan(top.value, bottom.value, tuple(edges))


def apply_band(tau: torch.Tensor, plan: BandPlan) -> torch.Tensor:
    """tau with the entries outside `plan` set to +0.0 (as `keep` drops)."""
    if cpu_kernels.enabled(tau):
        out = cpu_kernels.keep_band(tau, plan.top, plan.bottom)
    else:
        magnitudes = tau.abs()
        out = keep((magnitudes <= plan.top) & (magnitudes >= plan.bottom), tau)
    for value, low, high in plan.edges:
        if cpu_kernels.enabled(tau, out):
            cpu_kernels.drop_equal_outside(out, tau, value, low, high)
            continue
        positions = (tau.abs() == value).flatten().nonzero().squeeze(1)
        dropped = torch.cat([positions[:max(low, 0)], positions[max(high, 0):]])
        out.view(-1)[dropped] = 0.0
    return out


def breadcrumbs_band(tau: torch.Tensor, density: float, gamma: float, *, numel: int | None = None,
                     bounds: tuple[OrderStatistic, OrderStatistic] | None = None,
                     equal_before: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Model breadcrumbs: drop the top `gamma` fraction by |tau| and the bottom 1 - density - gamma fraction.

    Entries are ranked as a stable descending sort would rank them, without sorting: `bounds` are the order
    statistics at ranks first and stop - 1 (computed here for a whole tensor); entries strictly between them
    are kept, and entries equal to a bound are kept by their position among the equal ones. For a row chunk
    of a large tensor the caller passes the whole tensor's `numel` and `bounds`, and `equal_before`: how many
    entries equal to each bound precede the chunk.
    """
    first, stop = band_ranks(tau.numel() if numel is None else numel, density, gamma)
    if first >= stop:
        return torch.zeros_like(tau)
    if bounds is None:
        bounds = (*tensor_order_statistics(tau, [first, stop - 1]),)
    return apply_band(tau, band_plan(first, stop, bounds, equal_before))


def _row_order(tau: torch.Tensor) -> torch.Tensor:
    """Per row (last dim), the column indices by increasing |tau|, equal magnitudes by column: [rows, n].

    One sort of int64 keys (|tau| bit pattern, then column): unique keys order exactly as a stable sort of
    the magnitudes, and sorting values alone (numpy's SIMD sort on CPU) is several times faster than a
    stable argsort.
    """
    row_len = tau.shape[-1] if tau.dim() > 0 else 1
    bits = tau.abs().reshape(-1, row_len).view(torch.int32).to(torch.int64)
    keys = bits.bitwise_left_shift_(32).bitwise_or_(torch.arange(row_len, device=tau.device))
    ordered = torch.from_numpy(np.sort(keys.numpy(), axis=-1)) if keys.is_cpu else torch.sort(keys, dim=-1).values
    return ordered.bitwise_and_(0xFFFFFFFF)


def _by_row_rank(tau: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values[rank] at each entry, rank = its row magnitude rank (0 = smallest), shaped like tau."""
    order = _row_order(tau)
    return torch.empty(order.shape, dtype=values.dtype, device=tau.device).scatter_(
        -1, order, values.expand_as(order)).view(tau.shape)


def row_magnitude_ranks(tau: torch.Tensor) -> torch.Tensor:
    """Rank of each entry by |tau| within its row (last dim; rank 0 = smallest), shaped like tau."""
    row_len = tau.shape[-1] if tau.dim() > 0 else 1
    return _by_row_rank(tau, torch.arange(row_len, device=tau.device))


def della_drop(tau: torch.Tensor, density: float, epsilon: float, uniform: torch.Tensor) -> torch.Tensor:
    """DELLA MagPrune: keep probability p_r = (d - eps) + 2 eps r / (n - 1) by row rank r; survivors / p_r.

    A row of one entry keeps with probability d. Larger magnitudes are kept more often.
    """
    row_len = tau.shape[-1] if tau.dim() > 0 else 1
    if row_len == 1:
        keep_prob = torch.full_like(tau, density)
    else:
        by_rank = della_keep_probs(row_len, density, epsilon, tau.device)
        if cpu_kernels.enabled(tau, uniform):
            return cpu_kernels.della_drop_rows(tau, uniform, by_rank)
        keep_prob = _by_row_rank(tau, by_rank)
    return keep(uniform < keep_prob, tau / keep_prob)


def della_keep_probs(row_len: int, density: float, epsilon: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """DELLA's keep probability of each rank r in a row of row_len > 1 entries: (d - eps) + 2 eps r / (n - 1)."""
    ranks = torch.arange(row_len, dtype=torch.float32, device=device)
    return (density - epsilon) + (2.0 * epsilon / (row_len - 1)) * ranks
