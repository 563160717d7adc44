"""Drivers for statistics phases: map, sum, finalize, phase after phase.

`run_stats_phases` is the reference for whole-checkpoint phases (distributed executors do the same with the
map spread over workers; `sum_partials` is the reduction they share, `fold_partials` the map and sum of one
worker's tensors). `chunked_tensor_stats` and
`with_prefix_stats` run a method's tensor phases over the row chunks of one large tensor, in order: executors
call them around merging the chunks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from distmerge.methods.registry import MergeInputs, MergeMethod, PartialStats, StatsPhase, TensorContext

T = TypeVar("T")


def sum_partials(partials: Iterable[PartialStats]) -> PartialStats:
    """Elementwise sum of partial-stat dicts (same keys and shapes); the result lives on CPU."""
    total: PartialStats = {}
    for partial in partials:
        for key, value in partial.items():
            value = value.detach().cpu()
            if key in total:
                total[key] += value  # in place: the first partial was cloned
            else:
                total[key] = value.clone()
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
        summed = fold_partials(phase, params, ((inputs, with_stats(ctx, stats)) for inputs, ctx in tensors()))
        stats.update(phase.finalize(summed, params))
    return stats


def fold_partials(phase: StatsPhase, params: Any, items: Iterable[tuple[MergeInputs, TensorContext]]) -> PartialStats:
    """The sum of `phase`'s partials over `items` (on CPU): with `map_into`, each is added into one running
    partial; otherwise `sum_partials` of the maps. Integer partials give the same sum either way."""
    if phase.map_into is None:
        return sum_partials(phase.map(inputs, params, ctx) for inputs, ctx in items)
    total: PartialStats | None = None
    for inputs, ctx in items:
        total = phase.map_into(inputs, params, ctx, total)
    return {key: value.detach().cpu() for key, value in (total or {}).items()}


def chunked_tensor_stats(
    phases: Sequence[StatsPhase],
    params: Any,
    pieces: Callable[[], Iterable[tuple[MergeInputs, TensorContext]]],
) -> dict[str, Any]:
    """The totals of a tensor's phases (prefix phases excepted) over its row chunks: one pass per phase.

    `pieces()` yields the chunks' (inputs, ctx) in order, afresh on each call.
    """
    totals: dict[str, Any] = {}
    for phase in phases:
        if not phase.prefix:
            items = ((inputs, with_stats(ctx, totals)) for inputs, ctx in pieces())
            totals.update(phase.finalize(fold_partials(phase, params, items), params))
    return totals


def with_prefix_stats(
    phases: Sequence[StatsPhase],
    params: Any,
    items: Iterable[tuple[T, MergeInputs, TensorContext]],
    totals: Mapping[str, Any],
) -> Iterator[tuple[T, dict[str, Any]]]:
    """Each chunk (with its payload) and the stats to merge into its ctx: the totals, and per prefix phase the
    finalized sum of the chunks before it (none for the first chunk: methods read a missing value as zero).

    A chunk's own prefix partial is computed when the caller asks for the next chunk, after using this one, so
    prefix phases cost no pass of their own over the tensor (the caller must not modify the inputs).
    """
    prefix = [phase for phase in phases if phase.prefix]
    running: dict[str, PartialStats] = {}
    for payload, inputs, ctx in items:
        stats = dict(totals)
        for phase in prefix:
            if phase.name in running:
                stats.update(phase.finalize(running[phase.name], params))
        yield payload, stats
        for phase in prefix:
            partial = phase.map(inputs, params, with_stats(ctx, totals))
            running[phase.name] = sum_partials([running[phase.name], partial] if phase.name in running else [partial])
