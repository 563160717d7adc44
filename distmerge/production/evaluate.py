"""A run's evaluation: the merged model next to the base and every input, with results reused across runs.

Key decisions:
- Models are named for the gates' roles: `base`, each input by its name (`sft-<task>` is the specialist of
  <task> unless the spec maps specialists), and `merged`.
- The plan (suites read, roles resolved, gates checked against the roles) is made before the merge, so a
  typo in a gate or an unreadable suite fails in seconds instead of after the merge.
- Greedy decoding with fixed engine settings is deterministic, so the rows of a checkpoint whose
  fingerprint and suites (every prompt, answer and budget) are unchanged are reused from an earlier run of
  the same process: a scheduler re-evaluates only the merged model and new inputs on each tick. The cache
  lives in memory, with the engines it describes; a new process starts empty.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distmerge.evaluation import (
    EvalReport,
    Roles,
    Suite,
    check_gates,
    evaluate_models,
    parse_suite,
    resolve_roles,
)
from distmerge.evaluation.options import EvalOptions
from distmerge.production.sources import BASE_NAME, MERGED_NAME, Inputs
from distmerge.production.spec import PipelineSpec


@dataclass
class EvaluationPlan:
    models: dict[str, str]  # name -> URL, in report order: base, inputs, merged
    suites: list[Suite]
    roles: Roles
    digests: dict[str, str]  # name -> checkpoint fingerprint digest (not for the merged model: it is new)

    @property
    def suites_digest(self) -> str:
        digest = hashlib.sha256()
        for suite in self.suites:
            digest.update(json.dumps([suite.name, suite.max_tokens, suite.regex, suite.testbed_rule]).encode())
            for example in suite.examples:
                digest.update(json.dumps([example.task, example.prompt, example.answer, example.regex]).encode())
        return digest.hexdigest()


def evaluation_plan(spec: PipelineSpec, inputs: Inputs, model_url: str) -> EvaluationPlan:
    """Models, suites and roles of a run's evaluation; raises now if a gate cannot apply to them."""
    evaluation = spec.evaluation
    models = {BASE_NAME: inputs.base.url, **{m.name: m.url for m in inputs.models}, MERGED_NAME: model_url}
    suites = [parse_suite(s, n_per_task=evaluation.n_per_task, seed=evaluation.seed, regexes=evaluation.regexes,
                          max_tokens=evaluation.max_tokens, limit=evaluation.limit,
                          storage_options=spec.storage_options) for s in evaluation.suites]
    tasks = [task for suite in suites for task in suite.tasks]
    roles = resolve_roles(list(models), tasks, base=BASE_NAME, inputs=[m.name for m in inputs.models],
                          specialists=evaluation.specialists)
    check_gates(spec.gates, {model: dict.fromkeys(tasks, 0.0) for model in models}, roles)
    digests = {BASE_NAME: inputs.base.fingerprint["digest"],
               **{m.name: m.fingerprint["digest"] for m in inputs.models}}
    return EvaluationPlan(models, suites, roles, digests)


class ResultCache:
    """Rows of earlier evaluations, by (checkpoint fingerprint, suites digest)."""

    def __init__(self):
        self._rows: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def get(self, digest: str | None, suites: str) -> list[dict[str, Any]] | None:
        return None if digest is None else self._rows.get((digest, suites))

    def put(self, digest: str | None, suites: str, rows: list[dict[str, Any]]) -> None:
        if digest is not None:
            self._rows[(digest, suites)] = rows


def evaluate(plan: EvaluationPlan, gates: list[str], options: EvalOptions, pool, cache: ResultCache,
             storage_options: Mapping[str, Any] | None = None) -> EvalReport:
    """Evaluate the models not in `cache`, assemble the full report and check the gates on it."""
    suites_digest = plan.suites_digest
    reused = {name: [{**row, "model": name} for row in rows] for name in plan.models
              if (rows := cache.get(plan.digests.get(name), suites_digest)) is not None}
    todo = {name: url for name, url in plan.models.items() if name not in reused}
    fresh = evaluate_models(todo, plan.suites, options, roles=plan.roles, storage_options=storage_options, pool=pool)
    by_model: dict[str, list[dict[str, Any]]] = {name: [] for name in todo}
    for row in fresh.rows:
        by_model[row["model"]].append(row)
    for name, rows in by_model.items():
        cache.put(plan.digests.get(name), suites_digest, rows)
    rows = [row for name in plan.models for row in (reused.get(name) or by_model[name])]
    report = EvalReport(models=dict(plan.models), suites=fresh.suites, rows=rows, roles=plan.roles,
                        meta={**fresh.meta, "reused": sorted(reused)})
    report.gate_checks = check_gates(gates, report.accuracy(), plan.roles)
    return report
