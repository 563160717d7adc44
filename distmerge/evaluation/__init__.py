"""Evaluation of checkpoints with vLLM engines in Ray actors: suites, greedy scoring, reports, gates, load checks.

The pipeline reads as the modules: `suites` (what to ask and how to score) -> `engine` (vLLM in Ray actors,
local copies of remote checkpoints) -> `runner` (`evaluate_models`: data-parallel scheduling, scoring) ->
`report` (Parquet, JSON, Markdown, chart) and `gates` (roles and pass/fail rules). `load_check` verifies that
vLLM and transformers read a checkpoint the same way. Importing this package imports neither Ray nor vLLM.
"""

from distmerge.evaluation.gates import GateCheck, Roles, check_gates, parse_gate, resolve_roles
from distmerge.evaluation.load_check import LoadCheckError, LoadCheckResult, load_check
from distmerge.evaluation.options import EvalOptions
from distmerge.evaluation.report import EvalReport, write_report
from distmerge.evaluation.runner import evaluate_models
from distmerge.evaluation.suites import Suite, parse_suite, testbed_suite, user_suite

__all__ = [
    "EvalOptions", "EvalReport", "GateCheck", "LoadCheckError", "LoadCheckResult", "Roles", "Suite",
    "check_gates", "evaluate_models", "parse_gate", "load_check", "parse_suite", "resolve_roles", "testbed_suite", "user_suite",
    "write_report",
]
