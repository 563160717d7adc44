"""Resolve a spec's sources into the checkpoints of one run: expand globs, keep the ready ones, fingerprint.

Key decisions:
- A glob (`s3://bucket/agents/*/`) matches folders; each folder is a model named after it, in name order,
  so the recipe (and its hash) does not depend on listing order.
- A matched folder is *ready* when its index and every safetensors header load (an index naming a shard
  that is still uploading fails that) and, if the spec names a `ready_marker`, that file exists. Folders
  that are not ready are reported as waiting and left out: the next tick picks them up.
- An explicit (non-glob) source, the base and the target must load: they are configuration, not arrivals,
  so a problem with them is an error rather than a wait.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from distmerge.checkpoint import CheckpointIndex
from distmerge.errors import DistmergeError, RecipeError
from distmerge.production.fingerprint import FingerprintSet, checkpoint_fingerprint, fingerprint_set
from distmerge.production.spec import PipelineSpec, SourceSpec
from distmerge.recipe import Recipe, parse_recipe
from distmerge.storage import Location, translate_errors

log = logging.getLogger(__name__)

# Names the evaluation gives to the merged model and the base; inputs may not take them.
MERGED_NAME, BASE_NAME = "merged", "base"


@dataclass(frozen=True)
class Checkpoint:
    name: str
    url: str
    weight: float
    fingerprint: dict[str, Any]


@dataclass
class Inputs:
    """What one run merges: base (+ target) and the ready models, with their fingerprints."""

    base: Checkpoint
    target: Checkpoint | None
    models: list[Checkpoint]
    waiting: dict[str, str] = field(default_factory=dict)  # url -> why it is not ready yet
    fingerprints: FingerprintSet = field(init=False)

    def __post_init__(self) -> None:
        roles = {BASE_NAME: self.base, **({"target": self.target} if self.target else {}),
                 **{f"model:{m.name}": m for m in self.models}}
        self.fingerprints = fingerprint_set({role: c.fingerprint for role, c in roles.items()})

    def recipe(self, spec: PipelineSpec, output: str) -> Recipe:
        merge = spec.merge
        data = {"base": self.base.url, "models": [{"name": m.name, "path": m.url, "weight": m.weight}
                                                  for m in self.models],
                "method": merge.method, "params": dict(merge.params), "output": output, "seed": merge.seed,
                "dtype": merge.dtype, "storage_options": spec.storage_options}
        if self.target is not None:
            data["target"] = self.target.url
        if merge.schedule is not None:
            data["schedule"] = merge.schedule.model_dump()
        return parse_recipe(data, f"spec {spec.name}")

    def describe(self) -> str:
        waiting = f", {len(self.waiting)} waiting" if self.waiting else ""
        return (f"{len(self.models)} ready ({', '.join(m.name for m in self.models) or 'none'}){waiting}; "
                f"input set {self.fingerprints.digest[:12]}")


def resolve_inputs(spec: PipelineSpec) -> Inputs:
    """List and index every source (headers only) and fingerprint the ready checkpoints."""
    options = spec.storage_options
    base = _load(BASE_NAME, spec.merge.base, 1.0, options)
    target = _load("target", spec.merge.target, 1.0, options) if spec.merge.target else None
    fixed = [base.url] + ([target.url] if target else [])
    models: dict[str, Checkpoint] = {}
    waiting: dict[str, str] = {}
    for source in spec.merge.sources:
        for name, url in _expand(source, options):
            if any(Location(url, options).same_place(other) for other in fixed):
                continue  # a glob over a folder that also holds the base
            checkpoint, reason = _ready(source, name, url, spec.merge.ready_marker, options)
            if checkpoint is None:
                waiting[url] = reason
                log.info("not ready yet: %s (%s)", url, reason)
                continue
            _check_name(spec, checkpoint, models)
            models[name] = checkpoint
    return Inputs(base, target, sorted(models.values(), key=lambda c: c.name), waiting)


def _ready(source: SourceSpec, name: str, url: str, marker: str | None,
           options: dict) -> tuple[Checkpoint | None, str]:
    """The checkpoint at `url`, or None and why it is not ready (glob matches only: explicit sources must load)."""
    try:
        index = CheckpointIndex.load(url, options)
    except DistmergeError as exc:
        if not source.is_glob:
            raise
        return None, str(exc)  # e.g. an index naming a shard that is still uploading
    if source.is_glob and marker and marker not in index.listing:
        return None, f"no {marker} yet"
    return Checkpoint(name, url, source.weight, checkpoint_fingerprint(index)), ""


def _check_name(spec: PipelineSpec, checkpoint: Checkpoint, models: dict[str, Checkpoint]) -> None:
    name, url = checkpoint.name, checkpoint.url
    if name in models:
        raise RecipeError(f"spec {spec.name}: two sources give a model named {name!r} ({models[name].url} and "
                          f"{url}). Fix: name explicit sources with `name`, or rename a folder")
    if name in (MERGED_NAME, BASE_NAME):
        raise RecipeError(f"spec {spec.name}: input {url} is named {name!r}, a name the evaluation gives to the "
                          "merged model or the base. Fix: give the source another `name`")


def _expand(source: SourceSpec, options: dict) -> list[tuple[str, str]]:
    """(name, url) of the checkpoint(s) a source names."""
    if not source.is_glob:
        url = source.url.rstrip("/")
        return [(source.name or url.rsplit("/", 1)[-1], url)]
    pattern = Location(source.url.rstrip("/"), options)
    fs = pattern.fs
    with translate_errors(source.url, "list"):
        fs.invalidate_cache()  # a long-running scheduler must see new arrivals, not a cached listing
        matches = fs.glob(pattern.path, detail=True)
    folders = sorted(path.rstrip("/") for path, info in matches.items() if info.get("type") == "directory")
    return [(path.rsplit("/", 1)[-1], _url_of(pattern, path)) for path in folders]


def _url_of(pattern: Location, path: str) -> str:
    return path if pattern.local_path is not None else pattern.fs.unstrip_protocol(path)


def _load(name: str, url: str, weight: float, options: dict) -> Checkpoint:
    return Checkpoint(name, url, weight, checkpoint_fingerprint(CheckpointIndex.load(url, options)))
