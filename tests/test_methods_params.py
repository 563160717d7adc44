"""Every params validation error: a ValueError naming the method, the bad value and a fix."""

from __future__ import annotations

import pytest

from distmerge.methods import get_method

INVALID = [
    ("ties", {"density": 1.5}, r"ties: density must be in \(0, 1\], got 1.5; use e.g. density: 0.2"),
    ("ties", {"density": 0.0}, r"ties: density must be in \(0, 1\], got 0.0"),
    ("ties", {"density": -0.1}, r"ties: density must be in \(0, 1\], got -0.1"),
    ("ties", {"trim_scope": "layer"}, r"trim_scope\n.*'tensor' or 'global'"),
    ("ties", {"lambda": float("inf")}, r"lambda\n.*finite"),
    ("task_arithmetic", {"lambda": "big"}, r"lambda\n.*valid number"),
    (
        "dare_linear",
        {"density": 2.0},
        r"dare_linear: density must be in \(0, 1\], got 2.0; use e.g. density: 0.5",
    ),
    ("dare_ties", {"density": 0.0}, r"dare_ties: density must be in \(0, 1\]"),
    ("dare_ties", {"rescale": "l2"}, r"rescale\n.*'inverse_p' or 'l1'"),
    (
        "breadcrumbs",
        {"density": 1.2},
        r"breadcrumbs: density must be in \(0, 1\], got 1.2; use e.g. density: 0.9",
    ),
    (
        "breadcrumbs",
        {"gamma": -0.1},
        r"breadcrumbs: gamma must be in \[0, 1\), got -0.1; use e.g. gamma: 0.01",
    ),
    ("breadcrumbs", {"gamma": 1.0}, r"breadcrumbs: gamma must be in \[0, 1\), got 1.0"),
    (
        "breadcrumbs_ties",
        {"density": 0.95, "gamma": 0.1},
        r"breadcrumbs_ties: density \+ gamma must be <= 1, got 0.95 \+ 0.1; lower density or gamma",
    ),
    (
        "della",
        {"density": 0.1},
        r"della: need epsilon >= 0, density - epsilon > 0.*got density 0.1, epsilon 0.15",
    ),
    ("della", {"density": 0.9}, r"della: need .*density \+ epsilon <= 1, got density 0.9, epsilon 0.15"),
    ("della_linear", {"epsilon": -0.05}, r"della_linear: need epsilon >= 0.*got density 0.5, epsilon -0.05"),
    ("della_linear", {"density": 1.1}, r"della_linear: density must be in \(0, 1\], got 1.1"),
    ("ram", {"epsilon": -1e-5}, r"ram: epsilon must be >= 0, got -1e-05; use e.g. epsilon: 1e-5"),
    ("ram_plus", {"epsilon": -1.0}, r"ram_plus: epsilon must be >= 0"),
    ("ram_plus", {"rescale_factor": float("nan")}, r"rescale_factor\n.*finite"),
    ("ram_plus_tensor", {"r": -0.1}, r"ram_plus_tensor: r must be >= 0, got -0.1; use e.g. r: 0.1"),
    (
        "ram_plus_tensor",
        {"alpha": -1.0},
        r"ram_plus_tensor: alpha must be >= 0, got -1.0; use e.g. alpha: 0.2",
    ),
    ("linear", {"normalize": "sometimes"}, r"normalize\n.*valid boolean"),
    ("model_stock", {"density": 0.5}, r"density\n.*Extra inputs are not permitted"),
    ("ram", {"rescale_factor": 1.2}, r"rescale_factor\n.*Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("name", "raw", "message"), INVALID, ids=[f"{n}-{sorted(r)}" for n, r, _ in INVALID])
def test_invalid_params_raise_value_error(name, raw, message):
    with pytest.raises(ValueError, match=message):
        get_method(name).parse_params(raw)


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("ties", {"density": 1.0, "trim_scope": "global", "lambda": -1.0}),  # negative lambda: unlearning
        ("breadcrumbs", {"density": 0.9, "gamma": 0.1}),  # density + gamma == 1 exactly
        ("della", {"density": 0.5, "epsilon": 0.5 - 1e-9}),
        ("della", {"density": 0.85, "epsilon": 0.15}),  # d + eps == 1
        ("ram_plus", {"rescale_factor": 0.5}),  # clamped to 1 (RAM), not an error
        ("ram_plus_tensor", {"r": 0.0, "alpha": 0.0}),
    ],
)
def test_boundary_values_are_accepted(name, raw):
    get_method(name).parse_params(raw)


def test_defaults():
    assert get_method("ties").parse_params({}).model_dump() == {
        "scale": 1.0,
        "density": 0.2,
        "trim_scope": "tensor",
    }
    assert get_method("dare_ties").parse_params({}).model_dump() == {
        "scale": 1.0,
        "density": 0.5,
        "rescale": "inverse_p",
    }
    assert get_method("breadcrumbs").parse_params({}).model_dump() == {
        "scale": 1.0,
        "density": 0.9,
        "gamma": 0.01,
    }
    assert get_method("della").parse_params({}).model_dump() == {
        "scale": 1.0,
        "density": 0.5,
        "epsilon": 0.15,
    }
    assert get_method("ram_plus").parse_params({}).model_dump() == {"epsilon": 1e-5, "rescale_factor": 1.2}
    assert get_method("ram_plus_tensor").parse_params({}).model_dump() == {
        "epsilon": 1e-5,
        "r": 0.1,
        "alpha": 0.2,
    }
    assert get_method("linear").parse_params({}).model_dump() == {"normalize": True}
    assert get_method("task_arithmetic").parse_params(None).model_dump(by_alias=True) == {"lambda": 1.0}
