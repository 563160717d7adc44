"""Registry, linear, task arithmetic, model stock, and properties every method shares.

Expected values are worked by hand in the comments, never computed with the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from distmerge.methods import (
    MergeInputs,
    TensorContext,
    get_method,
    method_names,
    run_stats_phases,
    with_stats,
)

ALL_METHODS = [
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "linear",
    "model_stock",
    "ram",
    "ram_plus",
    "ram_plus_tensor",
    "task_arithmetic",
    "ties",
]


def merge(name, deltas, weights=None, base=None, seed=0, tensor="t", **params):
    """Merge one tensor with `name`, running its statistics phases over this single tensor first."""
    method = get_method(name)
    parsed = method.parse_params(params)
    deltas = [torch.as_tensor(d, dtype=torch.float32) for d in deltas]
    base = torch.zeros_like(deltas[0]) if base is None else torch.as_tensor(base, dtype=torch.float32)
    inputs = MergeInputs(base, deltas, list(weights or [1.0] * len(deltas)))
    ctx = TensorContext(tensor, seed)
    stats = run_stats_phases(method, parsed, lambda: [(inputs, ctx)])
    return method.merge(inputs, parsed, with_stats(ctx, stats))


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_all_builtins_registered():
    assert method_names() == sorted(ALL_METHODS)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown merge method 'tie'.*ties"):
        get_method("tie")


def test_every_param_field_has_default_and_description():
    for name in ALL_METHODS:
        for field_name, field in get_method(name).params_model.model_fields.items():
            assert not field.is_required(), (name, field_name)
            assert field.description, (name, field_name)


def test_lambda_alias_and_field_name():
    method = get_method("task_arithmetic")
    assert method.parse_params({"lambda": 0.3}).scale == 0.3
    assert method.parse_params({"scale": 0.3}).scale == 0.3


def test_linear_normalized_weighted_average():
    # tau1 = [1, 2], tau2 = [3, -2], w = [1, 3]: ([1, 2] + [9, -6]) / 4 = [2.5, -1]
    close(merge("linear", [[1.0, 2.0], [3.0, -2.0]], [1.0, 3.0], base=[10.0, 10.0]), [2.5, -1.0])


def test_linear_unnormalized_rescales_base():
    # theta1 = [11, 12], theta2 = [13, 8]; 1*theta1 + 3*theta2 = [50, 36]; delta from base [10, 10] = [40, 26]
    out = merge("linear", [[1.0, 2.0], [3.0, -2.0]], [1.0, 3.0], base=[10.0, 10.0], normalize=False)
    close(out, [40.0, 26.0])


def test_linear_of_identical_models_is_that_model():
    tau = torch.randn(3, 5)
    torch.testing.assert_close(merge("linear", [tau, tau, tau], [0.2, 0.5, 0.3]), tau)


def test_linear_zero_weight_sum_is_an_error():
    with pytest.raises(ValueError, match=r"linear: the weights \[1.0, -1.0\] sum to 0.*normalize: false"):
        merge("linear", [[1.0], [2.0]], [1.0, -1.0])


def test_task_arithmetic_scaled_weighted_sum():
    # 0.5 * (1 * [1, 2] + 3 * [3, -2]) = 0.5 * [10, -4] = [5, -2]
    close(merge("task_arithmetic", [[1.0, 2.0], [3.0, -2.0]], [1.0, 3.0], **{"lambda": 0.5}), [5.0, -2.0])


def test_model_stock_hand_example():
    # tau1 = [1, 0], tau2 = [1, 1]: cos = 1/sqrt2; t = 2 cos / (1 + cos) = 2 sqrt2 - 2; mean = [1, 0.5]
    t = 2 * math.sqrt(2) - 2
    close(merge("model_stock", [[1.0, 0.0], [1.0, 1.0]]), [t, 0.5 * t])


def test_model_stock_identical_deltas_give_t_one():
    tau = torch.randn(4, 3)
    torch.testing.assert_close(merge("model_stock", [tau, tau, tau]), tau)


def test_model_stock_ignores_weights():
    deltas = [[1.0, 0.0], [1.0, 1.0]]
    torch.testing.assert_close(merge("model_stock", deltas, [5.0, 1.0]), merge("model_stock", deltas))


@pytest.mark.parametrize(
    "deltas",
    [
        [[0.0, 0.0], [1.0, 1.0]],  # a zero vector has cosine 0: t = 0
        [[1.0, 0.0], [0.0, 1.0]],  # orthogonal pair: cos = 0, t = 0
        [[1.0, 0.0], [-1.0, 0.0]],  # opposite: 1 + cos = 0, no common direction, delta 0
    ],
)
def test_model_stock_degenerate_geometry_gives_zero(deltas):
    close(merge("model_stock", deltas), [0.0, 0.0])


def test_model_stock_needs_two_models():
    assert get_method("model_stock").min_models == 2


def _random_inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(6, 8, generator=generator).to(dtype)
    deltas = [(torch.randn(6, 8, generator=generator) * 0.01).to(dtype) for _ in range(3)]
    return base, deltas


@pytest.mark.parametrize("name", ALL_METHODS)
def test_bf16_inputs_upcast_by_caller_give_fp32_same_shape(name):
    base, deltas = _random_inputs(torch.bfloat16)
    out = merge(name, [d.float() for d in deltas], [0.5, 0.3, 0.2], base=base.float())
    assert out.dtype == torch.float32 and out.shape == base.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_METHODS)
def test_inputs_are_not_modified(name):
    base, deltas = _random_inputs()
    base_copy, deltas_copy = base.clone(), [d.clone() for d in deltas]
    params = {"normalize": False} if name == "linear" else {}  # so linear reads the base too
    merge(name, deltas, [1.0, 1.0, 1.0], base=base, **params)
    assert torch.equal(base, base_copy)
    assert all(torch.equal(d, c) for d, c in zip(deltas, deltas_copy, strict=True))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_result_independent_of_global_rng_and_call_order(name):
    _, deltas = _random_inputs()
    other = [d.flip(0) for d in deltas]
    torch.manual_seed(1)
    first = merge(name, deltas, tensor="a")
    merge(name, other, tensor="b")
    torch.manual_seed(2)
    merge(name, other, tensor="b")
    assert torch.equal(merge(name, deltas, tensor="a"), first)


# Divisors whose reciprocal is inexact (1/3 for linear over three models, 1/0.3 for DARE): CUDA divides by a
# Python number as a multiplication by its reciprocal, which distmerge must not inherit.
INEXACT_DIVISORS = [("dare_linear", {"density": 0.3}), ("dare_ties", {"density": 0.3})]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("name", "params"), [(name, {}) for name in ALL_METHODS] + INEXACT_DIVISORS)
def test_cuda_matches_cpu(name, params):
    """Same bits on both devices, except model_stock, whose cosines are float reductions (summation order)."""
    _, deltas = _random_inputs()
    on_cpu = merge(name, deltas, **params)
    on_gpu = merge(name, [d.cuda() for d in deltas], **params)
    assert on_gpu.device.type == "cuda"
    if name == "model_stock":
        torch.testing.assert_close(on_gpu.cpu(), on_cpu)
    else:
        assert torch.equal(on_gpu.cpu(), on_cpu), f"{name} {params}: GPU and CPU bits differ"
