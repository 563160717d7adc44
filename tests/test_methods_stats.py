"""Whole-checkpoint statistics: global TIES trimming and the RAM family.

A tiny driver below does what an executor does: map every tensor, sum, finalize, phase by phase, then
merge with the reduced values in ctx.stats. Hand-worked values are in the comments.
"""

from __future__ import annotations

import random

import pytest
import torch

from distmerge.methods import MergeInputs, TensorContext, get_method, run_stats_phases, with_stats
from distmerge.methods.ties_global import thresholds


def drive(name, tensors, weights=None, **params):
    """tensors: {tensor name: [tau_1, ..., tau_N]} -> ({name: merged delta}, stats)."""
    method = get_method(name)
    parsed = method.parse_params(params)
    items = []
    for tensor_name, deltas in tensors.items():
        deltas = [torch.as_tensor(d, dtype=torch.float32) for d in deltas]
        inputs = MergeInputs(torch.zeros_like(deltas[0]), deltas, list(weights or [1.0] * len(deltas)))
        items.append((inputs, TensorContext(tensor_name, seed=0)))
    stats: dict = {}
    for phase in method.phases_for(parsed):
        partials = [phase.map(inputs, parsed, with_stats(ctx, stats)) for inputs, ctx in items]
        summed = {key: sum(p[key] for p in partials) for key in partials[0]}
        stats.update(phase.finalize(summed, parsed))
    merged = {ctx.name: method.merge(inputs, parsed, with_stats(ctx, stats)) for inputs, ctx in items}
    return merged, stats


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


# --- TIES, trim_scope: global -----------------------------------------------------------------------------


def _checkpoint(num_models=3):
    generator = torch.Generator().manual_seed(0)
    shapes = {"embed": (16, 8), "layer.0.w": (8, 8), "layer.0.bias": (8,), "head": (8, 16)}
    checkpoint = {}
    for index, (name, shape) in enumerate(shapes.items()):
        # magnitudes spanning several exponents, a block of exact zeros, and repeated values
        deltas = [torch.randn(shape, generator=generator) * 10.0 ** (index - 2) for _ in range(num_models)]
        deltas[0].view(-1)[:5] = 0.0
        deltas[1].view(-1)[:4] = 0.125
        checkpoint[name] = deltas
    return checkpoint


def _topk_thresholds(checkpoint, density):
    thresholds_by_model = []
    for model in range(len(next(iter(checkpoint.values())))):
        magnitudes = torch.cat([deltas[model].abs().flatten() for deltas in checkpoint.values()])
        k = max(1, round(density * magnitudes.numel()))
        thresholds_by_model.append(torch.topk(magnitudes, k).values[-1].item())
    return thresholds_by_model


@pytest.mark.parametrize("density", [0.001, 0.1, 0.37, 0.9, 1.0])
def test_global_threshold_is_exact_kth_largest(density):
    checkpoint = _checkpoint()
    _, stats = drive("ties", checkpoint, density=density, trim_scope="global")
    assert thresholds(stats) == _topk_thresholds(checkpoint, density)


def test_global_threshold_inside_one_crowded_bin():
    # 1 + i * 2^-20 all share their upper 16 bits: the low-bit phase alone decides the k-th largest
    values = 1.0 + torch.arange(200, dtype=torch.float32) * 2.0**-20
    checkpoint = {"a": [values[:120]], "b": [values[120:].flip(0)]}
    _, stats = drive("ties", checkpoint, density=0.25, trim_scope="global")
    assert thresholds(stats) == [values[150].item()]  # the 50th largest of 200


def test_global_ties_merge_matches_reference():
    checkpoint = _checkpoint()
    weights = [1.0, 0.5, 2.0]
    merged, _ = drive("ties", checkpoint, weights, density=0.2, trim_scope="global", **{"lambda": 0.8})
    for name, deltas in checkpoint.items():
        trimmed = torch.stack(
            [d * (d.abs() >= t) for d, t in zip(deltas, _topk_thresholds(checkpoint, 0.2), strict=True)]
        )
        w = torch.tensor(weights).view(-1, *[1] * trimmed[0].dim())
        sign = torch.sign((w * trimmed).sum(0))
        agree = (trimmed != 0) & (torch.sign(trimmed) == sign)
        denominator = (w * agree).sum(0)
        expected = torch.where(
            denominator > 0, (w * trimmed * agree).sum(0) / denominator.clamp(min=1e-30), 0.0
        )
        torch.testing.assert_close(merged[name], 0.8 * expected)


def test_global_stats_independent_of_tensor_order():
    checkpoint = _checkpoint()
    shuffled = list(checkpoint.items())
    random.Random(0).shuffle(shuffled)
    _, reference = drive("ties", checkpoint, density=0.3, trim_scope="global")
    assert drive("ties", dict(shuffled), density=0.3, trim_scope="global")[1] == reference


def test_global_on_one_tensor_equals_tensor_scope():
    deltas = [torch.randn(10, 10), torch.randn(10, 10)]
    global_merged, _ = drive("ties", {"w": deltas}, density=0.3, trim_scope="global")
    tensor_merged, _ = drive("ties", {"w": deltas}, density=0.3)
    torch.testing.assert_close(global_merged["w"], tensor_merged["w"])


def test_reference_driver_agrees_and_phases_only_when_global():
    checkpoint = _checkpoint()
    method = get_method("ties")
    assert method.phases_for(method.parse_params({})) == ()
    params = method.parse_params({"trim_scope": "global", "density": 0.3})
    items = [
        (MergeInputs(torch.zeros_like(d[0]), d, [1.0] * 3), TensorContext(n)) for n, d in checkpoint.items()
    ]
    assert (
        run_stats_phases(method, params, lambda: items)
        == drive("ties", checkpoint, density=0.3, trim_scope="global")[1]
    )


def test_global_without_stats_is_a_clear_error():
    method = get_method("ties")
    inputs = MergeInputs(torch.zeros(2), [torch.ones(2)], [1.0])
    with pytest.raises(ValueError, match="statistics phases"):
        method.merge(inputs, method.parse_params({"trim_scope": "global"}), TensorContext("w"))


# --- RAM family ------------------------------------------------------------------------------------------

GOLDEN = {"t": [[0.5, 0.2, 0.0, 0.0], [0.0, 0.4, 0.3, 0.0]]}


def test_ram_golden():
    close(drive("ram", GOLDEN)[0]["t"], [0.5, 0.3, 0.3, 0.0])


def test_ram_plus_golden():
    # S = U = 1 for both models: rho = 1, lambda = 1 + 0.2 * 1 = 1.2 on unique entries
    merged, stats = drive("ram_plus", GOLDEN, rescale_factor=1.2)
    assert stats["ram_plus_lambdas"] == pytest.approx([1.2, 1.2])
    close(merged["t"], [0.6, 0.3, 0.36, 0.0])


def test_ram_plus_tensor_golden():
    # rho = 1 clipped to alpha 0.2: lambda = 1 + 0.1 * 0.2 = 1.02
    close(drive("ram_plus_tensor", GOLDEN)[0]["t"], [0.51, 0.3, 0.306, 0.0])


def test_ram_disjoint_supports_is_the_sum():
    a, b = torch.randn(6, 6), torch.randn(6, 6)
    a[:3], b[3:] = 0.0, 0.0
    torch.testing.assert_close(drive("ram", {"t": [a, b]})[0]["t"], a + b)


def test_ram_weights_multiply_first_and_epsilon_gates_activity():
    # weighted tau1 = [1, 0.4, 0, 1e-6]: e1 shared (0.4 + 0.4) / 2; e3 |1e-6| <= eps: inactive -> 0
    close(
        drive("ram", {"t": [[0.5, 0.2, 0.0, 5e-7], [0.0, 0.4, 0.3, 0.0]]}, [2.0, 1.0])[0]["t"],
        [1.0, 0.4, 0.3, 0.0],
    )


@pytest.mark.parametrize("factor", [1.0, 0.5])  # r = max(1, rescale_factor): below 1 is RAM too
def test_ram_plus_r_one_equals_ram(factor):
    checkpoint = {"a": [torch.randn(5, 5) * (torch.rand(5, 5) > 0.5) for _ in range(3)]}
    torch.testing.assert_close(
        drive("ram_plus", checkpoint, rescale_factor=factor)[0]["a"], drive("ram", checkpoint)[0]["a"]
    )


def test_ram_plus_counts_over_the_whole_checkpoint():
    # tensor A: m1 [0.5 unique, 0.2 shared], m2 [0, 0.4 shared]; tensor B: m1 [0, 0.1, 0.1] unique, m2 [0.3] unique
    # totals: m1 S=1 U=3 -> rho 1/3 -> lambda 1 + 0.2/3; m2 S=1 U=1 -> lambda 1.2
    checkpoint = {"A": [[0.5, 0.2, 0.0], [0.0, 0.4, 0.0]], "B": [[0.0, 0.1, 0.1], [0.3, 0.0, 0.0]]}
    merged, stats = drive("ram_plus", checkpoint)
    lam1 = 1 + 0.2 / 3
    assert stats["ram_plus_lambdas"] == pytest.approx([lam1, 1.2])
    close(merged["A"], [0.5 * lam1, 0.3, 0.0])
    close(merged["B"], [0.36, 0.1 * lam1, 0.1 * lam1])


def test_ram_plus_no_unique_entries_never_divides_by_zero():
    # m1 [S, U, U]: rho 1/2 -> 1.1; m2 only shared: U = 0, S > 0 -> rho 1 -> 1.2; m3 inactive: rho 0 -> 1
    merged, stats = drive("ram_plus", {"t": [[0.5, 0.5, 0.5], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]})
    assert stats["ram_plus_lambdas"] == pytest.approx([1.1, 1.2, 1.0])
    close(merged["t"], [0.5, 0.55, 0.55])


def test_ram_plus_without_stats_is_a_clear_error():
    method = get_method("ram_plus")
    inputs = MergeInputs(torch.zeros(2), [torch.ones(2), torch.ones(2)], [1.0, 1.0])
    with pytest.raises(ValueError, match="statistics phase"):
        method.merge(inputs, method.parse_params({}), TensorContext("w"))
