"""Exact top-k thresholds for TIES: over the whole checkpoint per model (`trim_scope: global`, the paper) or
over one tensor too large to merge whole (`trim_scope: tensor`, merged in row chunks).

The paper trims each task vector to its top-k entries by magnitude over the whole model, which no single
tensor can decide: two additive statistics passes (`radix`) find the exact k-th largest |tau_i| per model i,
k = round(density * numel). The same two passes, run by the executor over the row chunks of one large
tensor, give per-tensor TIES the exact threshold a whole-tensor selection would.

The merge keeps |tau_i| >= threshold_i: entries equal to the threshold are all kept, so when the k-th
largest value is repeated a model keeps slightly more than k entries (when it is 0, everything: harmless,
zeros never contribute).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distmerge.methods import radix
from distmerge.methods.sparsify import keep_count

GLOBAL_KEY = "ties_global"
TENSOR_KEY = "ties_tensor"


def _kth_largest_rank(numel: int, params: Any) -> list[int]:
    return [keep_count(params.density, numel) - 1]


def _is_global(params: Any) -> bool:
    return params.trim_scope == "global"


def thresholds(stats: Mapping[str, Any]) -> list[float]:
    """Per-model exact k-th largest |tau| over the checkpoint, from both global phases' results."""
    if not radix.has_order_statistics(stats, GLOBAL_KEY):
        raise ValueError(
            "ties: trim_scope global needs the statistics phases of `ties` to run before the merge; "
            "run them with distmerge.methods.stats.run_stats_phases or use trim_scope: tensor"
        )
    return [row[0].value for row in radix.order_statistics(stats, GLOBAL_KEY)]


def tensor_threshold(stats: Mapping[str, Any], index: int) -> float | None:
    """Model `index`'s k-th largest |tau| over the current tensor when the executor computed it over the
    tensor's chunks; None for a whole tensor (the sparsifier computes it)."""
    if not radix.has_order_statistics(stats, TENSOR_KEY):
        return None
    return radix.order_statistics(stats, TENSOR_KEY)[index][0].value


GLOBAL_TRIM_PHASES = radix.order_statistic_phases(GLOBAL_KEY, _kth_largest_rank, active=_is_global)
TENSOR_TRIM_PHASES = radix.order_statistic_phases(TENSOR_KEY, _kth_largest_rank)
