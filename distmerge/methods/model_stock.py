"""Model Stock (arXiv 2403.19522): move from the base towards the mean by a geometry-derived ratio.

Per tensor, cos = mean pairwise cosine similarity of the flattened task vectors (a zero vector has cosine
0 with everything), t = N cos / (1 + (N - 1) cos), delta = t * mean_i tau_i. Weights are ignored (the
method is unweighted). The denominator is >= 0 for any set of vectors and 0 only when the normalized task
vectors cancel exactly; then there is no common direction and the delta is 0.
"""

from __future__ import annotations

import itertools

import torch

from distmerge.methods.consensus import weighted_sum
from distmerge.methods.exact import one_thread
from distmerge.methods.registry import MergeInputs, MergeMethod, MethodParams, TensorContext, register


class ModelStockParams(MethodParams):
    """Model Stock has no parameters."""


def mean_pairwise_cosine(taus: list[torch.Tensor]) -> float:
    """Mean cosine similarity over all unordered pairs of flattened vectors; 0 for pairs with a zero vector."""
    flat = [tau.flatten() for tau in taus]
    norms = [float(torch.linalg.vector_norm(vector)) for vector in flat]
    cosines = []
    for (a, norm_a), (b, norm_b) in itertools.combinations(zip(flat, norms, strict=True), 2):
        cosines.append(float(torch.dot(a, b)) / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else 0.0)
    return sum(cosines) / len(cosines)


def interpolation_ratio(cos: float, num_models: int) -> float:
    """t = N cos / (1 + (N - 1) cos); 0 when the denominator vanishes."""
    denominator = 1.0 + (num_models - 1) * cos
    return num_models * cos / denominator if denominator > 1e-12 else 0.0


def model_stock(inputs: MergeInputs, params: ModelStockParams, ctx: TensorContext) -> torch.Tensor:
    taus = inputs.deltas
    with one_thread():
        cosine = mean_pairwise_cosine(taus)
    ratio = interpolation_ratio(cosine, len(taus))
    return weighted_sum(taus, [1.0] * len(taus)).mul_(ratio / len(taus))


register(
    MergeMethod(
        "model_stock",
        ModelStockParams,
        model_stock,
        min_models=2,
        doc="Model Stock: t * mean task vector, t from the mean pairwise cosine of the task vectors.",
    )
)
