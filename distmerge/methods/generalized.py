"""Generalized task arithmetic: one core, configured by a sparsifier and a consensus.

    delta = lambda * consensus_i( sparsify(tau_i) )

| method            | sparsifier                          | consensus |
|-------------------|-------------------------------------|-----------|
| task_arithmetic   | none                                | sum       |
| ties              | magnitude top-k (tensor or global)  | ties      |
| dare_linear       | DARE random drop                    | sum       |
| dare_ties         | DARE random drop                    | ties      |
| breadcrumbs       | breadcrumbs band                    | sum       |
| breadcrumbs_ties  | breadcrumbs band                    | ties      |
| della             | DELLA rank-based drop               | ties      |
| della_linear      | DELLA rank-based drop               | sum       |

Random sparsifiers draw their numbers from `rng.uniform_like(tau, ctx.seed, ctx.name, i)`, so a mask is a
pure function of (seed, tensor name, model index). Every variant can be merged in row chunks: what a
sparsifier needs from the whole tensor (TIES's top-k threshold, the breadcrumbs band, DARE's L1 norms) comes
from tensor phases with integer partials, so chunked and whole merges give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from distmerge.methods import cpu_kernels, exact, radix, sparsify, ties_global
from distmerge.methods.consensus import Consensus, combine
from distmerge.methods.generalized_params import (
    BreadcrumbsParams,
    BreadcrumbsTiesParams,
    DareLinearParams,
    DareParams,
    DareTiesParams,
    DellaLinearParams,
    DellaParams,
    TaskArithmeticParams,
    TiesParams,
)
from distmerge.methods.params import ScaledParams
from distmerge.methods.registry import (
    MergeInputs,
    MergeMethod,
    PartialStats,
    StatsPhase,
    TensorContext,
    register,
)
from distmerge.methods.rng import mask_key, uniform_like

# Model i's sparsified task vector, from this piece's inputs (the torch path: a new fp32 tensor).
Sparsifier = Callable[[MergeInputs, Any, TensorContext, int], torch.Tensor]
# A sparsifier that keeps |tau_i| >= a threshold gives the threshold of model i (None: it keeps every entry).
Threshold = Callable[[MergeInputs, Any, TensorContext, int], float | None]
# A random drop or a band as the combine kernel applies it, for these inputs.
Fused = Callable[[MergeInputs, Any, TensorContext], cpu_kernels.DareDrop | cpu_kernels.BandKeep]


def generalized_task_arithmetic(
    inputs: MergeInputs, params: Any, ctx: TensorContext, sparsifier: Sparsifier | None, consensus: Consensus,
    threshold: Threshold | None = None, fused: Fused | None = None,
) -> torch.Tensor:
    """lambda * consensus of the sparsified task vectors (a new fp32 tensor, inputs untouched)."""
    ties = consensus == "ties"
    tasks = cpu_kernels.task_sources(inputs)
    if fused is not None and tasks is not None:
        # The sparsifier inside the combine: the same bits, without storing random numbers or sparse vectors.
        how = fused(inputs, params, ctx)
        kind = "dare" if isinstance(how, cpu_kernels.DareDrop) else "band"
        return cpu_kernels.combine(tasks, inputs.weights, ties, params.scale, **{kind: how})
    if threshold is not None:
        thresholds = [threshold(inputs, params, ctx, index) for index in range(inputs.count)]
        if tasks is not None and all(t is not None for t in thresholds):
            # The trim fused into the combine: the same bits, without writing the trimmed vectors.
            return cpu_kernels.combine(tasks, inputs.weights, ties, params.scale, thresholds)
        taus = [tau.clone() if t is None else sparsify.keep_above(tau, t)
                for tau, t in zip(inputs.deltas, thresholds, strict=True)]
    elif sparsifier is not None:
        taus = [sparsifier(inputs, params, ctx, index) for index in range(inputs.count)]
    elif tasks is not None:
        return cpu_kernels.combine(tasks, inputs.weights, ties, params.scale)
    else:
        taus = inputs.deltas
    if cpu_kernels.enabled(*taus):
        return cpu_kernels.combine(taus, inputs.weights, ties, params.scale)
    return combine(consensus, taus, inputs.weights) * params.scale


# --- sparsifiers ----------------------------------------------------------------------------------------


def _ties_threshold(inputs: MergeInputs, params: TiesParams, ctx: TensorContext, index: int) -> float | None:
    """The |tau| TIES keeps at or above; None when it keeps every entry (NaN included)."""
    if params.trim_scope == "global":
        return ties_global.thresholds(ctx.stats)[index]
    known = ties_global.tensor_threshold(ctx.stats, index)
    return known if known is not None else sparsify.magnitude_topk_threshold(inputs.deltas[index], params.density)


def _uniform(tau: torch.Tensor, ctx: TensorContext, index: int) -> torch.Tensor:
    return uniform_like(tau, ctx.seed, ctx.name, index, offset=ctx.offset)


DARE_L1_KEY = "dare_l1_factors"


def _dare(inputs: MergeInputs, params: DareParams, ctx: TensorContext, index: int) -> torch.Tensor:
    tau, factors = inputs.deltas[index], ctx.stats.get(DARE_L1_KEY)
    return sparsify.dare_drop(tau, params.density, params.rescale, _uniform(tau, ctx, index),
                              None if factors is None else factors[index])


def _dare_l1_partials(inputs: MergeInputs, params: DareParams, ctx: TensorContext, index: int) -> torch.Tensor:
    taus = cpu_kernels.kernel_taus(inputs)
    if taus is not None:  # the numbers drawn inside the kernel, never stored
        key = mask_key(ctx.seed, ctx.name, index)
        return exact.dare_abs_partial(taus[index].x, key, ctx.offset, params.density, base=taus[index].base)
    tau = inputs.deltas[index]
    return sparsify.dare_l1_partials(tau, params.density, _uniform(tau, ctx, index))


def _dare_drop(inputs: MergeInputs, params: DareParams, ctx: TensorContext) -> cpu_kernels.DareDrop:
    keys = [mask_key(ctx.seed, ctx.name, index) for index in range(inputs.count)]
    if params.rescale == "inverse_p":
        return cpu_kernels.DareDrop(keys, ctx.offset, params.density, [params.density] * len(keys), divide=True)
    factors = ctx.stats.get(DARE_L1_KEY)
    if factors is None:  # a whole tensor: its own L1 norms
        factors = _finalize_dare_l1(_map_dare_l1(inputs, params, ctx), params)[DARE_L1_KEY]
    return cpu_kernels.DareDrop(keys, ctx.offset, params.density, factors, divide=False)


def _map_dare_l1(inputs: MergeInputs, params: DareParams, ctx: TensorContext) -> PartialStats:
    return {"l1": torch.stack([_dare_l1_partials(inputs, params, ctx, i) for i in range(inputs.count)])}


def _finalize_dare_l1(summed: PartialStats, params: DareParams) -> dict[str, Any]:
    return {DARE_L1_KEY: [sparsify.l1_rescale_factor(*map(exact.partial_value, partials))
                          for partials in summed["l1"]]}


DARE_L1_PHASES = (StatsPhase("dare_l1_norms", _map_dare_l1, _finalize_dare_l1),)

BAND_KEY = "breadcrumbs_band"
BAND_EQUAL_KEY = "breadcrumbs_equal_before"


def _band_ranks(numel: int, params: BreadcrumbsParams) -> list[int]:
    first, stop = sparsify.band_ranks(numel, params.density, params.gamma)
    return [first, stop - 1] if first < stop else []


def _band_plan(inputs: MergeInputs, params: BreadcrumbsParams, ctx: TensorContext, index: int) -> sparsify.BandPlan:
    """Model `index`'s band over this piece: from the tensor phases' statistics for a row chunk, else from
    its own task vector (a whole tensor)."""
    first, stop = sparsify.band_ranks(ctx.numel or inputs.numel, params.density, params.gamma)
    if first >= stop:
        return sparsify.KEEP_NOTHING
    if not radix.has_order_statistics(ctx.stats, BAND_KEY):
        bounds = radix.tensor_order_statistics(inputs.deltas[index], [first, stop - 1])
        return sparsify.band_plan(first, stop, (*bounds,))
    before = ctx.stats.get(BAND_EQUAL_KEY)
    return sparsify.band_plan(first, stop, (*radix.order_statistics(ctx.stats, BAND_KEY)[index],),
                              (0, 0) if before is None else (*before[index],))


def _breadcrumbs(inputs: MergeInputs, params: BreadcrumbsParams, ctx: TensorContext, index: int) -> torch.Tensor:
    return sparsify.apply_band(inputs.deltas[index], _band_plan(inputs, params, ctx, index))


def _breadcrumbs_band(inputs: MergeInputs, params: BreadcrumbsParams, ctx: TensorContext) -> cpu_kernels.BandKeep:
    return cpu_kernels.BandKeep([_band_plan(inputs, params, ctx, index) for index in range(inputs.count)])


def _map_band_equal(inputs: MergeInputs, params: BreadcrumbsParams, ctx: TensorContext) -> PartialStats:
    """How many entries of this chunk equal each band bound (a prefix phase: later chunks get the sums)."""
    counts = []
    taus = cpu_kernels.kernel_taus(inputs)
    for m, bounds in enumerate(radix.order_statistics(ctx.stats, BAND_KEY)):
        if taus is not None:
            counts.append(cpu_kernels.count_equal_magnitudes(taus[m].x, [b.value for b in bounds], taus[m].base))
            continue
        magnitudes = inputs.deltas[m].abs()
        counts.append(torch.tensor([int((magnitudes == b.value).sum()) for b in bounds], dtype=torch.int64))
    return {"equal": torch.stack(counts)}


def _finalize_band_equal(summed: PartialStats, params: BreadcrumbsParams) -> dict[str, Any]:
    return {BAND_EQUAL_KEY: summed["equal"].tolist()}


BAND_PHASES = (
    *radix.order_statistic_phases(BAND_KEY, _band_ranks),
    StatsPhase("breadcrumbs_equal_before", _map_band_equal, _finalize_band_equal, prefix=True),
)


def _della(inputs: MergeInputs, params: DellaParams, ctx: TensorContext, index: int) -> torch.Tensor:
    taus = cpu_kernels.kernel_taus(inputs)
    if taus is not None and taus[index].x.dim() > 0 and taus[index].x.shape[-1] > 1:
        # The numbers drawn and the task vector formed row by row inside the kernel: the same bits, neither
        # stored.
        tau = taus[index]
        keep_prob = sparsify.della_keep_probs(tau.x.shape[-1], params.density, params.epsilon)
        return cpu_kernels.della_drop_drawn(tau, mask_key(ctx.seed, ctx.name, index), ctx.offset, keep_prob)
    tau = inputs.deltas[index]
    return sparsify.della_drop(tau, params.density, params.epsilon, _uniform(tau, ctx, index))


# --- registration ---------------------------------------------------------------------------------------


def _register_variant(
    params_model: type[ScaledParams],
    sparsifier: Sparsifier | None,
    consensus: Consensus,
    doc: str,
    stats_phases: tuple[StatsPhase, ...] = (),
    chunking: str = "elements",
    tensor_phases=lambda params: (),
    threshold: Threshold | None = None,
    fused: Fused | None = None,
) -> None:
    def merge(inputs: MergeInputs, params: Any, ctx: TensorContext) -> torch.Tensor:
        return generalized_task_arithmetic(inputs, params, ctx, sparsifier, consensus, threshold, fused)

    name = params_model.method_name
    register(MergeMethod(name, params_model, merge, stats_phases=stats_phases, doc=doc,
                         chunking=lambda params: chunking, tensor_phases=tensor_phases))


def _dare_phases(params: DareParams) -> tuple[StatsPhase, ...]:
    return DARE_L1_PHASES if params.rescale == "l1" else ()


_register_variant(TaskArithmeticParams, None, "sum", "lambda * sum_i w_i tau_i.")
_register_variant(
    TiesParams,
    None,
    "ties",
    "TIES (arXiv 2306.01708): top-k trim by |tau|, sign election, disjoint weighted mean, times lambda.",
    stats_phases=ties_global.GLOBAL_TRIM_PHASES,
    tensor_phases=lambda params: ties_global.TENSOR_TRIM_PHASES if params.trim_scope == "tensor" else (),
    threshold=_ties_threshold,
)
_register_variant(
    DareLinearParams, _dare, "sum", "DARE (arXiv 2311.03099) random drop and rescale, weighted sum.",
    tensor_phases=_dare_phases, fused=_dare_drop,
)
_register_variant(
    DareTiesParams, _dare, "ties", "DARE random drop and rescale, TIES sign election + disjoint mean.",
    tensor_phases=_dare_phases, fused=_dare_drop,
)
_register_variant(
    BreadcrumbsParams,
    _breadcrumbs,
    "sum",
    "Model breadcrumbs (arXiv 2312.06795): drop outliers and small entries, sum.",
    tensor_phases=lambda params: BAND_PHASES, fused=_breadcrumbs_band,
)
_register_variant(
    BreadcrumbsTiesParams, _breadcrumbs, "ties", "Breadcrumbs band, TIES sign election + disjoint mean.",
    tensor_phases=lambda params: BAND_PHASES, fused=_breadcrumbs_band,
)
_register_variant(
    DellaParams,
    _della,
    "ties",
    "DELLA (arXiv 2406.11617): rank-based random drop per row, sign election + mean.",
    chunking="rows",
)
_register_variant(DellaLinearParams, _della, "sum", "DELLA rank-based random drop per row, weighted sum.",
                  chunking="rows")
