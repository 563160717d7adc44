"""Linear (weighted average of whole models), written in delta space.

theta = sum_i w_i theta_i / sum_i w_i (normalize) or sum_i w_i theta_i. With theta_i = b + tau_i the delta
from the base b is sum_i w_i tau_i / sum_i w_i, or (sum_i w_i - 1) * b + sum_i w_i tau_i: without
normalization the base itself is rescaled, which the delta must carry.
"""

from __future__ import annotations

import torch
from pydantic import Field

from distmerge.methods import exact
from distmerge.methods.consensus import weighted_sum
from distmerge.methods.registry import MergeInputs, MergeMethod, MethodParams, TensorContext, register


class LinearParams(MethodParams):
    normalize: bool = Field(True, description="Divide by the sum of the weights (a weighted average).")


def check_linear_weights(params: LinearParams, weights: list[float]) -> None:
    if params.normalize and sum(weights) == 0:
        raise ValueError(
            f"linear: the weights {weights} sum to 0, so they cannot be normalized; "
            "give weights with a nonzero sum or set normalize: false"
        )


def linear(inputs: MergeInputs, params: LinearParams, ctx: TensorContext) -> torch.Tensor:
    check_linear_weights(params, inputs.weights)
    total_weight = sum(inputs.weights)
    summed = weighted_sum(inputs.deltas, inputs.weights)
    if not params.normalize:
        return summed.add_(inputs.base * (total_weight - 1.0))  # no fused alpha: see weighted_sum
    return exact.divide_(summed, total_weight)


register(MergeMethod("linear", LinearParams, linear, doc="Weighted average of the models (delta form).",
                     check_weights=check_linear_weights, chunking=lambda params: "elements"))
