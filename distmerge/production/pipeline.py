"""One production run: merge on Ray -> evaluate (merged, base, inputs) with vLLM -> gates -> publish -> ledger row.

Layout of a run under the publish root: `runs/<run-id>/model/` (the merged checkpoint, with provenance),
`runs/<run-id>/eval/` (results.parquet, report.json, report.md, chart.png). Only when every gate passes is
`latest.json` moved to the new model; otherwise it is not touched. A run that fails for any reason still
leaves a ledger row (status failed, with the error) and returns rather than raising, so a scheduler goes on
ticking and a job entrypoint can exit non-zero with the message.

Key decisions:
- Ray and the actor pools come from a `Runtime` (runtime.py) that outlives one run.
- The evaluation is planned (suites read, gates checked against the roles) *before* the merge, and results
  of unchanged checkpoints are reused across runs (`evaluate.py`).
- The recipe hash leaves out the output URL (new for every run): two runs of the same template on the same
  inputs share it, which is what the scheduler's "already merged" check compares.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from distmerge.errors import DistmergeError
from distmerge.evaluation import EvalReport, write_report
from distmerge.production.evaluate import evaluate, evaluation_plan
from distmerge.production.lease import Lease
from distmerge.production.ledger import Ledger, RunRecord
from distmerge.production.publish import promote, read_pointer
from distmerge.production.runtime import Runtime
from distmerge.production.sources import MERGED_NAME, Inputs, resolve_inputs
from distmerge.production.spec import PipelineSpec
from distmerge.recipe import Recipe
from distmerge.storage import Location

log = logging.getLogger(__name__)

class LeaseLost(DistmergeError):
    """Another scheduler took the lease during the run: publishing now could overwrite its newer result."""


@dataclass
class RunResult:
    run_id: str
    status: str
    recipe_hash: str
    fingerprint_set: str
    output_url: str | None = None
    report_url: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    failed_gates: list[str] = field(default_factory=list)
    pointer: dict[str, Any] | None = None
    error: str | None = None

    def describe(self) -> str:
        if self.status == "published":
            return f"run {self.run_id} published {self.output_url} (gates passed; latest.json updated)"
        if self.status == "gate_failed":
            return (f"run {self.run_id}: gate failed, latest.json left untouched; merged model kept at "
                    f"{self.output_url}, report at {self.report_url}:\n  " + "\n  ".join(self.failed_gates))
        if self.status == "merged":
            return f"run {self.run_id} merged and evaluated {self.output_url} (not promoted)"
        return f"run {self.run_id} {self.status}: {self.error}"


def template_hash(recipe: Recipe) -> str:
    """Hash of the canonical recipe without its output URL (which is new for every run)."""
    canonical = {k: v for k, v in recipe.canonical().items() if k != "output"}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def new_run_id(inputs: Inputs, now: dt.datetime) -> str:
    """Sortable by start time; names the input set; unique even for two runs in the same second."""
    return f"{now:%Y%m%dT%H%M%SZ}-{inputs.fingerprints.digest[:8]}-{uuid.uuid4().hex[:4]}"


def run_paths(spec: PipelineSpec, run_id: str) -> tuple[str, str]:
    """(model URL, eval report URL) of a run."""
    run_root = Location(spec.publish.root, spec.storage_options).child("runs", run_id)
    return run_root.child("model").url, run_root.child("eval").url


def run_pipeline(spec: PipelineSpec, runtime: Runtime, *, inputs: Inputs | None = None,
                 lease: Lease | None = None) -> RunResult:
    """Merge, evaluate, gate and (when every gate passes) publish; always appends one ledger row."""
    started = dt.datetime.now(dt.UTC)
    inputs = inputs or resolve_inputs(spec)
    run_id = new_run_id(inputs, started)
    model_url, report_url = run_paths(spec, run_id)
    recipe = inputs.recipe(spec, model_url)
    result = RunResult(run_id, "failed", template_hash(recipe), inputs.fingerprints.digest)
    log.info("run %s: merging %s into %s", run_id, inputs.describe(), model_url)
    try:
        plan = evaluation_plan(spec, inputs, model_url)
        with _timed(result, "merge"):
            from distmerge.merge import run_merge

            result.output_url = run_merge(recipe, runtime.run_options, pool=runtime.merge_pool()).output
        with _timed(result, "eval"):
            report = evaluate(plan, spec.gates, runtime.eval_options, runtime.engine_pool(), runtime.results,
                              spec.storage_options)
            write_report(report, report_url, spec.storage_options)
            result.report_url = report_url
        conclude(spec, result, report, lease)
    except Exception as exc:  # recorded in the ledger and returned: the caller decides whether to go on
        log.exception("run %s failed", run_id)
        result.status, result.error = "failed", f"{type(exc).__name__}: {exc}"
    _record(spec, result, inputs, started)
    return result


def conclude(spec: PipelineSpec, result: RunResult, report: EvalReport, lease: Lease | None = None) -> None:
    """Set the run's status from its gates; promote the model only when every gate passed."""
    accuracy = report.accuracy()
    result.failed_gates = [check.describe() for check in report.failed_gates]
    result.metrics = {"accuracy": accuracy, "gates": [check.describe() for check in report.gate_checks],
                      "gates_passed": not report.failed_gates, "report": result.report_url}
    if report.failed_gates:
        result.status = "gate_failed"
        return
    if not spec.publish.promote:
        result.status = "merged"
        return
    if lease is not None and not lease.still_held():
        raise LeaseLost(f"lease {lease.root} passed to another scheduler during run {result.run_id}; not "
                        "publishing over its result. Fix: raise lease.expiry_seconds above the run time")
    with _timed(result, "publish"):
        result.pointer = promote(spec.publish.root, url=result.output_url, run_id=result.run_id,
                                 recipe_hash=result.recipe_hash, storage_options=spec.storage_options,
                                 metrics={"accuracy": accuracy[MERGED_NAME], "report": result.report_url})
    result.status = "published"


@contextlib.contextmanager
def _timed(result: RunResult, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        result.durations[stage] = round(time.perf_counter() - start, 3)


def _record(spec: PipelineSpec, result: RunResult, inputs: Inputs, started: dt.datetime) -> None:
    record = RunRecord(
        run_id=result.run_id, pipeline=spec.name, started_at=started, finished_at=dt.datetime.now(dt.UTC),
        status=result.status, recipe_hash=result.recipe_hash, fingerprint_set=result.fingerprint_set,
        fingerprints=inputs.fingerprints.to_json(), merge_seconds=result.durations.get("merge"),
        eval_seconds=result.durations.get("eval"), publish_seconds=result.durations.get("publish"),
        metrics=json.dumps(result.metrics), output_url=result.output_url, error=result.error)
    Ledger(spec.ledger_url, spec.storage_options).append(record)


def describe_run(spec: PipelineSpec, *, workers: int | None = None) -> dict[str, Any]:
    """What a run would do now, from listings and headers only (the one-shot job's --dry-run); writes nothing."""
    from distmerge.merge import plan_recipe

    inputs = resolve_inputs(spec)
    out: dict[str, Any] = {"pipeline": spec.name, "base": inputs.base.url,
                           "models": {m.name: m.url for m in inputs.models}, "waiting": inputs.waiting,
                           "fingerprint_set": inputs.fingerprints.digest,
                           "latest": read_pointer(spec.publish.root, spec.storage_options)}
    if len(inputs.models) < spec.merge.min_models:
        out["would_run"] = False
        out["reason"] = f"fewer than merge.min_models={spec.merge.min_models} checkpoints are ready"
        return out
    model_url, _ = run_paths(spec, "RUN-ID")
    recipe = inputs.recipe(spec, model_url)
    options = spec.run if workers is None else spec.run.model_copy(update={"workers": workers})
    plan, job = plan_recipe(recipe, options)
    evaluation = evaluation_plan(spec, inputs, model_url)
    decided = Ledger(spec.ledger_url, spec.storage_options).decided(spec.name, template_hash(recipe),
                                                                    inputs.fingerprints.digest)
    out.update({
        "would_run": True, "recipe_hash": template_hash(recipe), "recipe": recipe.canonical(),
        "plan": {"hash": plan.hash(), "blocks": len(plan.blocks), "output_bytes": plan.total_bytes,
                 "statistics_passes": [phase.name for phase in job.phases()], "workers": options.workers},
        "evaluation": {"models": list(evaluation.models),
                       "suites": {s.name: len(s.examples) for s in evaluation.suites}},
        "gates": spec.gates,
        "already_decided": None if decided is None else {k: decided[k] for k in ("run_id", "status", "output_url")},
    })
    return out
