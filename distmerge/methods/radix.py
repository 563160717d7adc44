"""Exact order statistics of |tau_i| from two additive histogram passes (a radix select on fp32 bits).

For non-negative floats the fp32 bit pattern, read as int32, orders like the value. Two passes find the exact
value at chosen ranks (0-based, descending: rank 0 is the largest |tau|) of every model's task vector using
integer histograms only, so the result is the same however the entries were split: per block over a whole
checkpoint (TIES with global trimming), per row chunk over one large tensor (per-tensor TIES, breadcrumbs),
or one whole tensor. It is also faster than `torch.kthvalue` or a sort on CPU.

1. high: per model, a histogram of the upper 16 bits of |tau| ([N, 65536] int64) and the numel; `finalize`
   picks per model and wanted rank the bin that holds it.
2. low: per model and rank, a histogram of the lower 16 bits of the entries inside that bin, the count of
   entries above the bin and the numel (so this phase's `finalize`, which sees only its own sums, knows how
   far into the bin the rank lies); `finalize` picks the low bits and counts the larger and equal entries.
   One bincount gives both: bit patterns relative to the bin's first one, clamped to [-1, 65536], put every
   entry below the bin in one extra bin and every entry above it in another (no masks, no compaction).

`order_statistics(stats, key)` joins both results: per model and rank an `OrderStatistic`.

Partials live on CPU with the same keys and shapes for every tensor; results are JSON-friendly lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from distmerge.methods import cpu_kernels
from distmerge.methods.registry import MergeInputs, PartialStats, StatsPhase, TensorContext

NUM_BINS = 1 << 16
# (numel, params) -> the ranks wanted, the same for every model; each in [0, numel).
Ranks = Callable[[int, Any], list[int]]


class OrderStatistic(NamedTuple):
    value: float  # the exact |tau| at the rank (an fp32 value)
    greater: int  # entries with a strictly larger |tau|
    equal: int  # entries with exactly this |tau|


def magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """|tau| as int32 bit patterns (monotone in the value for non-negative floats), flattened."""
    return tau.abs().flatten().view(torch.int32)


def _add_high_histogram(tau: torch.Tensor, into: torch.Tensor) -> None:
    """into ([65536] int64, contiguous, on CPU) += the histogram of the upper 16 bits of |tau|."""
    if cpu_kernels.enabled(tau):
        cpu_kernels.add_high_histogram(tau, into)
    else:
        into += torch.bincount(magnitude_bits(tau) >> 16, minlength=NUM_BINS).cpu()


def _add_bin_histogram(tau: torch.Tensor, high_bin: int, into: torch.Tensor) -> int:
    """into += the histogram of the low 16 bits of the |tau| in `high_bin`; returns how many entries lie above
    that bin."""
    if cpu_kernels.enabled(tau):
        return cpu_kernels.add_bin_histogram(tau, high_bin, into)
    relative = (magnitude_bits(tau) - ((high_bin << 16) - 1)).clamp_(0, NUM_BINS + 1)  # 0: below, 65537: above
    counts = torch.bincount(relative, minlength=NUM_BINS + 2).cpu()
    into += counts[1:NUM_BINS + 1]
    return int(counts[NUM_BINS + 1])


def _high_histogram(tau: torch.Tensor) -> torch.Tensor:
    """Histogram of the upper 16 bits of |tau| ([65536] int64, on CPU)."""
    histogram = torch.zeros(NUM_BINS, dtype=torch.int64)
    _add_high_histogram(tau, histogram)
    return histogram


def _bin_histogram(tau: torch.Tensor, high_bin: int) -> tuple[torch.Tensor, int]:
    """(histogram of the low 16 bits of the |tau| in `high_bin`, how many entries lie above that bin)."""
    histogram = torch.zeros(NUM_BINS, dtype=torch.int64)
    return histogram, _add_bin_histogram(tau, high_bin, histogram)


def _locate(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """(bin, entries in higher bins) of the entry at 0-based descending `rank` of a count histogram."""
    from_top = histogram.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([rank + 1], dtype=from_top.dtype)).item())
    return NUM_BINS - 1 - position, int(from_top[position - 1]) if position else 0


def _bits_to_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def _numel(count: int) -> torch.Tensor:
    return torch.tensor(count, dtype=torch.int64)


def order_statistic_phases(key: str, ranks: Ranks,
                           active: Callable[[Any], bool] | None = None) -> tuple[StatsPhase, StatsPhase]:
    """The two phases; their result, per model and rank, is read with `order_statistics(stats, key)`."""
    high_key = f"{key}_high_bins"

    # The maps add into one result tensor in place (`map_into`: the running sum over a block's or a tensor's
    # chunks): a chunk's 65536-bin histograms cost as much memory traffic as its entries, so no per-model or
    # per-chunk tensors to allocate, stack and sum.
    def map_high(inputs: MergeInputs, params: Any, ctx: TensorContext, into: PartialStats | None = None) -> PartialStats:
        if into is None:
            into = {"high": torch.zeros(inputs.count, NUM_BINS, dtype=torch.int64), "numel": _numel(0)}
        taus = cpu_kernels.kernel_taus(inputs)  # bf16 inputs are read as they are
        if taus is not None:
            for tau, row in zip(taus, into["high"], strict=True):
                cpu_kernels.add_high_histogram(tau.x, row, tau.base)
        else:
            for tau, row in zip(inputs.deltas, into["high"], strict=True):
                _add_high_histogram(tau, row)
        into["numel"] += inputs.numel
        return into

    def finalize_high(summed: PartialStats, params: Any) -> dict[str, Any]:
        wanted = ranks(int(summed["numel"]), params)
        return {high_key: [[_locate(row, rank)[0] for rank in wanted] for row in summed["high"]]}

    def map_low(inputs: MergeInputs, params: Any, ctx: TensorContext, into: PartialStats | None = None) -> PartialStats:
        bins = ctx.stats[high_key]
        if into is None:
            low = torch.zeros(inputs.count, len(bins[0]) if bins else 0, NUM_BINS, dtype=torch.int64)
            into = {"low": low, "above": torch.zeros(low.shape[:2], dtype=torch.int64), "numel": _numel(0)}
        low, above = into["low"], into["above"]
        taus = cpu_kernels.kernel_taus(inputs)  # bf16 inputs are read as they are
        for m, model_bins in enumerate(bins):
            if taus is None:
                for r, high_bin in enumerate(model_bins):
                    above[m, r] += _add_bin_histogram(inputs.deltas[m], high_bin, low[m, r])
            elif len(model_bins) == 2:  # two bins, one pass over tau
                cpu_kernels.add_bin_histogram_pair(taus[m].x, model_bins, low[m], above[m], taus[m].base)
            else:
                for r, high_bin in enumerate(model_bins):
                    above[m, r] += cpu_kernels.add_bin_histogram(taus[m].x, high_bin, low[m, r], taus[m].base)
        into["numel"] += inputs.numel
        return into

    def finalize_low(summed: PartialStats, params: Any) -> dict[str, Any]:
        # The high bins live in the first phase's result; `order_statistics` joins the two.
        wanted = ranks(int(summed["numel"]), params)
        out = []
        for lows, aboves in zip(summed["low"], summed["above"].tolist(), strict=True):
            row = []
            for low, above, rank in zip(lows, aboves, wanted, strict=True):
                low_bin, above_in_bin = _locate(low, rank - above)
                row.append([low_bin, above + above_in_bin, int(low[low_bin])])
            out.append(row)
        return {f"{key}_low_bins": out}

    return (StatsPhase(f"{key}_high_bits", map_high, finalize_high, active, map_into=map_high),
            StatsPhase(f"{key}_low_bits", map_low, finalize_low, active, map_into=map_low))


def has_order_statistics(stats: Mapping[str, Any], key: str) -> bool:
    return f"{key}_high_bins" in stats and f"{key}_low_bins" in stats


def order_statistics(stats: Mapping[str, Any], key: str) -> list[list[OrderStatistic]]:
    """Per model, per wanted rank: the exact value and the counts of larger and equal entries."""
    return [
        [OrderStatistic(_bits_to_float((high << 16) | low), greater, equal)
         for high, (low, greater, equal) in zip(highs, lows, strict=True)]
        for highs, lows in zip(stats[f"{key}_high_bins"], stats[f"{key}_low_bins"], strict=True)
    ]


# Below this many entries a sort is cheaper than two 65536-bin histograms (the results are the same: exact).
_SORT_BELOW = 1 << 16


def tensor_order_statistics(tau: torch.Tensor, ranks: list[int]) -> list[OrderStatistic]:
    """The same statistics of |tau| for one whole tensor, in one call (what the two phases give for a single
    piece)."""
    tau = tau.flatten()
    if tau.numel() < _SORT_BELOW:
        magnitudes = tau.abs()
        ordered = magnitudes.sort(descending=True).values
        return [OrderStatistic(float(ordered[rank]), int((magnitudes > ordered[rank]).sum()),
                               int((magnitudes == ordered[rank]).sum())) for rank in ranks]
    high_histogram = _high_histogram(tau)
    out = []
    for rank in ranks:
        high_bin, above = _locate(high_histogram, rank)
        low, _ = _bin_histogram(tau, high_bin)
        low_bin, above_in_bin = _locate(low, rank - above)
        out.append(OrderStatistic(_bits_to_float((high_bin << 16) | low_bin), above + above_in_bin,
                                  int(low[low_bin])))
    return out
