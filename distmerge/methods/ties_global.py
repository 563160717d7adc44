"""Exact whole-checkpoint top-k threshold per model, for TIES with `trim_scope: global`.

The paper trims each task vector to its top-k entries by magnitude over the whole model, which no single
tensor can decide. Two additive statistics passes find the exact k-th largest |tau_i| per model i
(k = round(density * total numel)):

1. For non-negative floats the fp32 bit pattern, read as int32, orders like the value. Each tensor maps to a
   histogram of the upper 16 bits of |tau_i| per model ([N, 65536] int64) plus its numel; `finalize` finds
   per model the bin that holds the k-th largest magnitude.
2. Each tensor maps to a histogram of the lower 16 bits of the entries inside that bin, plus the count of
   entries above the bin and its numel (so this phase's `finalize`, which sees only its own sums, knows how
   far into the bin the k-th largest lies); `finalize` returns the low 16 bits of the k-th largest.

Upper and lower bits together are the threshold's exact bit pattern (`thresholds`). The merge keeps
|tau_i| >= threshold_i: entries equal to the threshold are all kept, so when the k-th largest value is
repeated a model keeps slightly more than k entries (when it is 0, everything: harmless, zeros never
contribute). Partials are returned on CPU, with the same keys and shapes for every tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from distmerge.methods.registry import MergeInputs, PartialStats, StatsPhase, TensorContext
from distmerge.methods.sparsify import keep_count

NUM_BINS = 1 << 16
HIGH_BINS_KEY = "ties_high_bins"
LOW_BINS_KEY = "ties_low_bins"


def _magnitude_bits(tau: torch.Tensor) -> torch.Tensor:
    """|tau| as int32 bit patterns (monotone in the value for non-negative floats), flattened."""
    return tau.abs().flatten().view(torch.int32)


def _histogram(values: torch.Tensor) -> torch.Tensor:
    return torch.bincount(values.long(), minlength=NUM_BINS).cpu()


def _kth_largest_bin(histogram: torch.Tensor, k: int) -> int:
    """Index of the bin holding the k-th largest entry (1-based) of a 1-D count histogram."""
    from_top = histogram.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)).item())
    return NUM_BINS - 1 - position


def _numel(inputs: MergeInputs) -> torch.Tensor:
    return torch.tensor(inputs.base.numel(), dtype=torch.int64)


def _map_high(inputs: MergeInputs, params: Any, ctx: TensorContext) -> PartialStats:
    rows = [_histogram(_magnitude_bits(tau) >> 16) for tau in inputs.deltas]
    return {"high": torch.stack(rows), "numel": _numel(inputs)}


def _finalize_high(summed: PartialStats, params: Any) -> dict[str, Any]:
    k = keep_count(params.density, int(summed["numel"]))
    return {HIGH_BINS_KEY: [_kth_largest_bin(row, k) for row in summed["high"]]}


def _map_low(inputs: MergeInputs, params: Any, ctx: TensorContext) -> PartialStats:
    low_rows, above = [], []
    for tau, high_bin in zip(inputs.deltas, ctx.stats[HIGH_BINS_KEY], strict=True):
        bits = _magnitude_bits(tau)
        high_bits = bits >> 16
        low_rows.append(_histogram(bits[high_bits == high_bin] & 0xFFFF))
        above.append(int((high_bits > high_bin).sum()))
    return {
        "low": torch.stack(low_rows),
        "above": torch.tensor(above, dtype=torch.int64),
        "numel": _numel(inputs),
    }


def _finalize_low(summed: PartialStats, params: Any) -> dict[str, Any]:
    k = keep_count(params.density, int(summed["numel"]))
    rows = zip(summed["low"], summed["above"].tolist(), strict=True)
    return {LOW_BINS_KEY: [_kth_largest_bin(row, k - above) for row, above in rows]}


def _bits_to_float(bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def thresholds(stats: Mapping[str, Any]) -> list[float]:
    """Per-model exact k-th largest |tau| over the checkpoint, from both phases' results in `ctx.stats`."""
    if HIGH_BINS_KEY not in stats or LOW_BINS_KEY not in stats:
        raise ValueError(
            "ties: trim_scope global needs the statistics phases of `ties` to run before the merge; "
            "run them with distmerge.methods.stats.run_stats_phases or use trim_scope: tensor"
        )
    return [
        _bits_to_float((high << 16) | low)
        for high, low in zip(stats[HIGH_BINS_KEY], stats[LOW_BINS_KEY], strict=True)
    ]


def _is_global(params: Any) -> bool:
    return params.trim_scope == "global"


GLOBAL_TRIM_PHASES = (
    StatsPhase("ties_magnitude_high_bits", _map_high, _finalize_high, active=_is_global),
    StatsPhase("ties_magnitude_low_bits", _map_low, _finalize_low, active=_is_global),
)
