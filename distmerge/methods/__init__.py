"""Merge methods: pure per-tensor functions registered by name.

Importing this package registers every built-in method. Look methods up with `get_method(name)`; run
whole-checkpoint statistics with `stats.run_stats_phases` before merging when `method.phases_for(params)`
is not empty.
"""

from distmerge.methods import basic, generalized, model_stock, ram  # noqa: F401  (registers built-ins)
from distmerge.methods.registry import (
    MergeInputs,
    MergeMethod,
    MethodParams,
    StatsPhase,
    TensorContext,
    get_method,
    method_names,
    register,
)
from distmerge.methods.stats import run_stats_phases, sum_partials, with_stats

__all__ = [
    "MergeInputs",
    "MergeMethod",
    "MethodParams",
    "StatsPhase",
    "TensorContext",
    "get_method",
    "method_names",
    "register",
    "run_stats_phases",
    "sum_partials",
    "with_stats",
]
