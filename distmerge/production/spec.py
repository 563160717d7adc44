"""Pipeline specs: one YAML file drives both the one-shot job (merge -> eval -> gate -> publish) and the
scheduler that re-runs it when new checkpoints land.

A spec holds a recipe *template* (`merge`: base, sources, method, params; the output is chosen per run), how
to run the merge (`run`, the fields of `RunOptions`), the evaluation (suites, prompts per task, actors, engine
settings), the gates, where results are published, the run ledger, the lease and the schedule. Every error
names the field, the bad value and the fix. Suites are checked for spelling here; user suite files are read
when a run starts (they may not exist yet when the spec is written).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distmerge.errors import RecipeError
from distmerge.evaluation.gates import parse_gate
from distmerge.evaluation.options import EvalOptions
from distmerge.methods.registry import get_method, method_names
from distmerge.options import RunOptions
from distmerge.production.cron import Cron, parse_cron
from distmerge.schedule import LinesSchedule

GLOB_CHARS = re.compile(r"[*?\[]")


def _sizes(value: Any, key: str) -> Any:
    """Let YAML say `256MiB` where the options model wants bytes, as the CLI flags do."""
    if isinstance(value, dict) and isinstance(value.get(key), str):
        import click

        from distmerge.cli.options import parse_size

        try:
            return {**value, key: parse_size(value[key])}
        except click.BadParameter as exc:
            raise ValueError(f"{key}: {exc.message}") from None
    return value


class SourceSpec(BaseModel):
    """A checkpoint, or a glob whose matching folders are each a checkpoint (e.g. s3://bucket/agents/*/)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="Checkpoint URL, or a glob over checkpoint folders; each match becomes a model "
                     "named after its folder.")
    name: str | None = Field(None, description="Model name for a single checkpoint (default: its folder name).")
    weight: float = Field(1.0, description="Weight of every model from this source.")

    @property
    def is_glob(self) -> bool:
        return bool(GLOB_CHARS.search(self.url))

    @model_validator(mode="after")
    def _name_only_for_single(self) -> SourceSpec:
        if self.name is not None and self.is_glob:
            raise ValueError(f"source {self.url!r} is a glob, so each match is named after its folder; remove "
                             f"name {self.name!r} or list the checkpoint without wildcards")
        return self


class MergeSpec(BaseModel):
    """The recipe template: like a recipe, with sources instead of models and no output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(description="URL of the common base.")
    sources: list[SourceSpec] = Field(description="Checkpoints or globs over checkpoint folders (strings or "
                                      "{url, name, weight}).")
    method: str = Field(description="Merge method; `distmerge methods` lists them.")
    params: dict[str, Any] = Field(default_factory=dict, description="Method parameters.")
    target: str | None = Field(None, description="URL the merged vector is added to (default: base).")
    seed: int = Field(0, description="Seed of random choices (DARE, DELLA masks).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Output dtype.")
    schedule: LinesSchedule | None = Field(None, description="Optional LiNeS layer scaling.")
    min_models: int = Field(1, ge=1, description="Wait (do nothing) until at least this many checkpoints are ready.")
    ready_marker: str | None = Field(None, description="File name (e.g. _SUCCESS) a matched folder must hold to "
                                     "count as ready; default: ready when its index and headers are complete.")

    @field_validator("sources", mode="before")
    @classmethod
    def _strings_are_urls(cls, value: Any) -> Any:
        return [{"url": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in method_names():
            raise ValueError(f"unknown method {value!r}; choose one of: {', '.join(method_names())}")
        return value

    @model_validator(mode="after")
    def _params_parse(self) -> MergeSpec:
        if not self.sources:
            raise ValueError("sources is empty; list at least one checkpoint URL or glob (e.g. s3://bucket/agents/*/)")
        try:
            get_method(self.method).parse_params(self.params)
        except ValidationError as exc:
            raise ValueError(f"params for {self.method}: {format_errors(exc, prefix='params')}") from None
        return self


class EvaluationSpec(BaseModel):
    """What the merged model, the base and the inputs are evaluated on, and with how many engines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suites: list[str] = Field(description="Suites as `distmerge eval --suite` spells them: testbed, "
                              "testbed:reversal,uppercase, NAME=URL of a JSONL/Parquet file.")
    n_per_task: int = Field(200, ge=1, description="Prompts per testbed task.")
    seed: int = Field(0, description="Seed of the testbed prompts.")
    max_tokens: int | None = Field(None, ge=1, description="New-token budget for every suite (default: the suite's).")
    limit: int | None = Field(None, ge=1, description="Use only the first N rows of each user suite.")
    regexes: dict[str, str] = Field(default_factory=dict, description="Suite name -> extraction regex (user suites).")
    specialists: dict[str, str] = Field(default_factory=dict, description="Task -> input model name (default: the "
                                        "input named sft-<task>), for gates against `specialist`.")
    actors: int = Field(1, ge=1, description="vLLM engine actors (data parallel).")
    engine: EvalOptions = Field(default_factory=EvalOptions, description="Engine settings (device, dtype, "
                                "kv_cache_size, cpus_per_actor, ...; the fields of `distmerge eval`).")

    @field_validator("engine", mode="before")
    @classmethod
    def _kv_cache_size(cls, value: Any) -> Any:
        return _sizes(value, "kv_cache_size")

    @field_validator("suites")
    @classmethod
    def _suites_spelled(cls, value: list[str]) -> list[str]:
        from distmerge.testbed.tasks import get_task

        if not value:
            raise ValueError("suites is empty; give at least one, e.g. testbed or gsm8k=s3://bucket/gsm8k.jsonl")
        for suite in value:
            if suite.startswith("testbed:"):
                for task in filter(None, suite.partition(":")[2].split(",")):
                    get_task(task)
        return value

    @model_validator(mode="after")
    def _actors_in_one_place(self) -> EvaluationSpec:
        if self.engine.num_actors != self.actors and "num_actors" in self.engine.model_fields_set:
            raise ValueError(f"engine.num_actors ({self.engine.num_actors}) disagrees with actors ({self.actors}); "
                             "set evaluation.actors only")
        if self.engine.address is not None:
            raise ValueError("engine.address: the Ray address is a flag of the job (--address), not part of the spec")
        return self

    def options(self, address: str | None) -> EvalOptions:
        return self.engine.model_copy(update={"num_actors": self.actors, "address": address})


class PublishSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str = Field(description="Runs go to <root>/runs/<run-id>/ (model/, eval/); <root>/latest.json points at "
                      "the last model whose gates passed.")
    promote: bool = Field(True, description="Move latest.json when the gates pass; false merges and evaluates "
                          "only (a shadow pipeline; runs are recorded as merged).")


class LeaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(None, description="Prefix of the lease objects (default: <publish.root>/lease).")
    expiry_seconds: float = Field(3600.0, gt=0, description="A holder that stops renewing loses the lease after "
                                  "this long; it is renewed every third of it while a run is in progress.")


class ScheduleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    interval_seconds: float | None = Field(None, gt=0, description="Seconds between ticks.")
    cron: str | None = Field(None, description="Five-field cron expression in UTC, e.g. '*/15 * * * *'.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ScheduleSpec:
        if (self.interval_seconds is None) == (self.cron is None):
            raise ValueError("give exactly one of interval_seconds (e.g. 300) or cron (e.g. '*/5 * * * *')")
        if self.cron is not None:
            parse_cron(self.cron)
        return self

    def parsed_cron(self) -> Cron | None:
        return parse_cron(self.cron) if self.cron else None


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Names the pipeline in the ledger "
                      "and logs (letters, digits, . _ -).")
    merge: MergeSpec
    run: RunOptions = Field(default_factory=RunOptions, description="How the merge runs (workers, block_size, ...).")
    evaluation: EvaluationSpec
    gates: list[str] = Field(default_factory=list, description="SUBJECT>=[FACTOR*]REFERENCE, e.g. "
                             "'merged>=0.9*specialist'; all must pass to publish.")
    publish: PublishSpec
    ledger: str | None = Field(None, description="Prefix of the run ledger (default: <publish.root>/ledger).")
    lease: LeaseSpec = Field(default_factory=LeaseSpec)
    schedule: ScheduleSpec | None = Field(None, description="When the scheduler ticks (needed by `watch`).")
    max_failures: int = Field(3, ge=1, description="The scheduler stops retrying one input set after this many "
                              "failed runs (a new checkpoint resets it).")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for every URL "
                                            "(credentials belong in the environment).")

    @field_validator("run", mode="before")
    @classmethod
    def _block_size(cls, value: Any) -> Any:
        return _sizes(value, "block_size")

    @field_validator("gates")
    @classmethod
    def _gates_parse(cls, value: list[str]) -> list[str]:
        for gate in value:
            parse_gate(gate)
        return value

    @property
    def ledger_url(self) -> str:
        return self.ledger or f"{self.publish.root.rstrip('/')}/ledger"

    @property
    def lease_url(self) -> str:
        return self.lease.url or f"{self.publish.root.rstrip('/')}/lease"


def parse_spec(data: Any, source: str = "spec") -> PipelineSpec:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping (name, merge, evaluation, gates, publish, ...), "
                          f"got {type(data).__name__}")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {format_errors(exc)}") from None


def load_spec(path: str | Path) -> PipelineSpec:
    """Read a YAML spec from a local path or URL."""
    from distmerge.storage import Location

    text = Path(path).read_text() if Path(str(path)).exists() else Location(str(path)).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    return parse_spec(data, str(path))


_FIXES = {"missing": "add it to the spec", "extra_forbidden": "remove it or check its spelling",
          "literal_error": "use one of the allowed values", "float_parsing": "use a number",
          "int_parsing": "use an integer", "bool_parsing": "use true or false",
          "string_pattern_mismatch": "use letters, digits, '.', '_' and '-'"}


def format_errors(exc: ValidationError, prefix: str = "") -> str:
    """Each error as `field a.b.c: message (got value); fix`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"])) or "spec"
        value = err.get("input")
        shown = "" if isinstance(value, dict) or err["type"] == "missing" else f" (got {value!r})"
        fix = _FIXES.get(err["type"])
        parts.append(f"field {loc}: {err['msg'].removeprefix('Value error, ')}{shown}{'; ' + fix if fix else ''}")
    return "; ".join(parts)
