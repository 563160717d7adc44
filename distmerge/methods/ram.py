"""RAM and RAM+ ("Behavior Knowledge Merge in Reinforced Agentic Models", arXiv 2601.13572).

RL task vectors are sparse and overlap little, so averaging dilutes them. With M_i = |tau_i| > eps and
c = sum_i M_i per entry: c = 0 keeps the base (delta 0); c = 1 (unique) keeps the single active tau_i;
c >= 2 (shared) takes the mean over the active contributors only, sum_i M_i tau_i / c. Weights multiply
tau_i before everything (default 1, the paper).

RAM+ scales unique entries of model i by lambda_i = 1 + (r - 1) * min(1, rho_i), r = max(1, rescale_factor),
rho_i = S_i / U_i from whole-checkpoint counts S_i = #(M_i and c >= 2), U_i = #(M_i and c = 1): one
statistics phase. U_i = 0 gives rho_i = 1 if S_i > 0 else 0 (the official script divides by zero).
`ram_plus_tensor` is a per-tensor variant some tools ship: rho_i per tensor, lambda_i = 1 + r clip(rho_i, 0,
alpha). It is not RAM+.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field, ValidationInfo, field_validator

from distmerge.methods import cpu_kernels
from distmerge.methods.params import invalid
from distmerge.methods.registry import (
    MergeInputs,
    MergeMethod,
    MethodParams,
    PartialStats,
    StatsPhase,
    TensorContext,
    register,
)
from distmerge.methods.select import choose, keep

LAMBDAS_KEY = "ram_plus_lambdas"


class RamParams(MethodParams):
    method_name: ClassVar[str] = "ram"

    epsilon: float = Field(1e-5, description="An entry of tau_i is active when |tau_i| > epsilon (>= 0).")

    @field_validator("epsilon")
    @classmethod
    def _epsilon_non_negative(cls, value: float) -> float:
        if not value >= 0.0:
            raise invalid(cls.method_name, f"epsilon must be >= 0, got {value}", "use e.g. epsilon: 1e-5")
        return value


class RamPlusParams(RamParams):
    method_name: ClassVar[str] = "ram_plus"

    rescale_factor: float = Field(
        1.2,
        allow_inf_nan=False,
        description="r; unique entries scale up to max(1, r) (1.2 published, 1 = RAM).",
    )


class RamPlusTensorParams(RamParams):
    method_name: ClassVar[str] = "ram_plus_tensor"

    r: float = Field(0.1, description="Strength: lambda_i = 1 + r * clip(rho_i, 0, alpha), r >= 0.")
    alpha: float = Field(0.2, description="Upper clip of the per-tensor overlap ratio rho_i, alpha >= 0.")

    @field_validator("r", "alpha")
    @classmethod
    def _non_negative(cls, value: float, info: ValidationInfo) -> float:
        if not 0.0 <= value < float("inf"):
            default = cls.model_fields[info.field_name].default
            raise invalid(
                cls.method_name,
                f"{info.field_name} must be >= 0, got {value}",
                f"use e.g. {info.field_name}: {default}",
            )
        return value


def _weighted(inputs: MergeInputs) -> list[torch.Tensor]:
    return [
        tau if weight == 1 else tau * weight
        for tau, weight in zip(inputs.deltas, inputs.weights, strict=True)
    ]


def _activity(taus: Sequence[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-model activity masks and the active count c per entry."""
    masks = [tau.abs() > epsilon for tau in taus]
    count = torch.zeros(taus[0].shape, dtype=torch.int32, device=taus[0].device)
    for mask in masks:
        count += mask
    return masks, count


def _overlap_counts(masks: Sequence[torch.Tensor], count: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per model: (#entries active and shared, #entries active and unique)."""
    shared = [int((mask & (count >= 2)).sum()) for mask in masks]
    unique = [int((mask & (count == 1)).sum()) for mask in masks]
    return shared, unique


def overlap_ratio(shared: int, unique: int) -> float:
    """rho = S / U; with U = 0, 1 if S > 0 else 0."""
    if unique == 0:
        return 1.0 if shared > 0 else 0.0
    return shared / unique


def ram_combine(
    taus: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    count: torch.Tensor,
    unique_scales: Sequence[float],
) -> torch.Tensor:
    """Shared entries: active mean; unique entries: unique_scales[i] * tau_i; inactive: 0."""
    active_sum = torch.zeros_like(taus[0])
    scaled_sum = torch.zeros_like(taus[0])
    for tau, mask, scale in zip(taus, masks, unique_scales, strict=True):
        active = keep(mask, tau)
        active_sum += active
        scaled_sum.add_(active if scale == 1.0 else active * scale)  # no fused alpha: see weighted_sum
    shared_mean = active_sum / count.clamp(min=1)
    return choose(count >= 2, shared_mean, keep(count == 1, scaled_sum))


def _overlap(inputs: MergeInputs, epsilon: float) -> tuple[list[int], list[int]]:
    """Per model (shared, unique) active counts of the weighted task vectors (fused on CPU)."""
    if cpu_kernels.enabled(*inputs.deltas):
        return cpu_kernels.ram_overlap_counts(inputs.deltas, inputs.weights, epsilon)
    return _overlap_counts(*_activity(_weighted(inputs), epsilon))


def _merge(inputs: MergeInputs, epsilon: float, unique_scales: Sequence[float]) -> torch.Tensor:
    """`ram_combine` of the weighted task vectors and their activity (fused on CPU)."""
    if cpu_kernels.enabled(*inputs.deltas):
        return cpu_kernels.ram_combine(inputs.deltas, inputs.weights, epsilon, unique_scales)
    taus = _weighted(inputs)
    return ram_combine(taus, *_activity(taus, epsilon), unique_scales)


def ram(inputs: MergeInputs, params: RamParams, ctx: TensorContext) -> torch.Tensor:
    return _merge(inputs, params.epsilon, [1.0] * inputs.count)


def _map_overlap(inputs: MergeInputs, params: RamPlusParams, ctx: TensorContext) -> PartialStats:
    shared, unique = _overlap(inputs, params.epsilon)
    return {
        "shared": torch.tensor(shared, dtype=torch.int64),
        "unique": torch.tensor(unique, dtype=torch.int64),
    }


def _finalize_overlap(summed: PartialStats, params: RamPlusParams) -> dict[str, Any]:
    r = max(1.0, params.rescale_factor)
    ratios = [
        overlap_ratio(s, u) for s, u in zip(summed["shared"].tolist(), summed["unique"].tolist(), strict=True)
    ]
    return {LAMBDAS_KEY: [1.0 + (r - 1.0) * min(1.0, rho) for rho in ratios]}


def ram_plus(inputs: MergeInputs, params: RamPlusParams, ctx: TensorContext) -> torch.Tensor:
    if LAMBDAS_KEY not in ctx.stats:
        raise ValueError(
            "ram_plus needs its statistics phase (whole-checkpoint overlap counts) to run before the merge; "
            "run it with distmerge.methods.stats.run_stats_phases"
        )
    return _merge(inputs, params.epsilon, ctx.stats[LAMBDAS_KEY])


TENSOR_SCALES_KEY = "ram_plus_tensor_scales"


def _tensor_scales(shared: Sequence[int], unique: Sequence[int], params: RamPlusTensorParams) -> list[float]:
    return [
        1.0 + params.r * min(max(overlap_ratio(s, u), 0.0), params.alpha)
        for s, u in zip(shared, unique, strict=True)
    ]


def _finalize_tensor_scales(summed: PartialStats, params: RamPlusTensorParams) -> dict[str, Any]:
    return {TENSOR_SCALES_KEY: _tensor_scales(summed["shared"].tolist(), summed["unique"].tolist(), params)}


def ram_plus_tensor(inputs: MergeInputs, params: RamPlusTensorParams, ctx: TensorContext) -> torch.Tensor:
    scales = ctx.stats.get(TENSOR_SCALES_KEY)  # from the tensor phase when merged in row chunks
    if scales is None:
        scales = _tensor_scales(*_overlap(inputs, params.epsilon), params)
    return _merge(inputs, params.epsilon, scales)


register(
    MergeMethod("ram", RamParams, ram, doc="RAM: active-only mean on shared entries, unique entries kept.",
                chunking=lambda params: "elements")
)
register(
    MergeMethod(
        "ram_plus",
        RamPlusParams,
        ram_plus,
        stats_phases=(StatsPhase("ram_plus_overlap_counts", _map_overlap, _finalize_overlap),),
        doc="RAM+: RAM with unique entries of model i scaled by lambda_i from whole-checkpoint overlap counts.",
        chunking=lambda params: "elements",  # lambda_i come from whole-checkpoint stats
    )
)
_TENSOR_PHASES = (StatsPhase("ram_plus_tensor_overlap_counts", _map_overlap, _finalize_tensor_scales),)
register(
    MergeMethod(
        "ram_plus_tensor",
        RamPlusTensorParams,
        ram_plus_tensor,
        doc="Per-tensor RAM variant: lambda_i = 1 + r * clip(rho_i, 0, alpha), rho_i per tensor (not RAM+).",
        chunking=lambda params: "elements",  # the per-tensor counts are integers: a tensor phase when chunked
        tensor_phases=lambda params: _TENSOR_PHASES,
    )
)
