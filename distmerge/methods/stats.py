"""Reference driver for statistics phases: map over every tensor, sum, finalize, phase after phase.

Distributed executors do the same with the map spread over workers; `sum_partials` is the reduction
they share, and this single-process loop is what their results are compared against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from distmerge.methods.registry import MergeInputs, MergeMethod, PartialStats, TensorContext


def sum_partials(partials: Iterable[PartialStats]) -> PartialStats:
    """Elementwise sum of partial-stat dicts (same keys and shapes); the result lives on CPU."""
    total: PartialStats = {}
    for partial in partials:
        for key, value in partial.items():
            value = value.detach().cpu()
            total[key] = value.clone() if key not in total else total[key] + value
    return total


def with_stats(ctx: TensorContext, stats: Mapping[str, Any]) -> TensorContext:
    """`ctx` with `stats` merged over its own stats."""
    return dataclasses.replace(ctx, stats={**ctx.stats, **stats})


def run_stats_phases(
    method: MergeMethod,
    params: Any,
    tensors: Callable[[], Iterable[tuple[MergeInputs, TensorContext]]],
) -> dict[str, Any]:
    """Run the phases `params` need over the whole checkpoint and return the stats the merge reads.

    `tensors()` must yield every tensor's (inputs, ctx) afresh on each call: one pass per phase. Pass the
    result to the merge as `with_stats(ctx, stats)`.
    """
    stats: dict[str, Any] = {}
    for phase in method.phases_for(params):
        summed = sum_partials(phase.map(inputs, params, with_stats(ctx, stats)) for inputs, ctx in tensors())
        stats.update(phase.finalize(summed, params))
    return stats
