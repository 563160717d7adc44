"""Recipes: what to merge, as YAML validated into typed models.

A recipe names checkpoints by URL, the method and its parameters, an optional LiNeS schedule, the output
and its dtype. `target` (default: `base`) is where the merged vector lands: with base = SFT, models = [GRPO]
and target = another model, a recipe expresses reasoning-vector transfer and skill-vector injection.
How to run (workers, block size, device) is not in the recipe: see `distmerge.options.RunOptions`.
Every error names the field, the bad value and the fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distmerge.errors import RecipeError
from distmerge.methods.registry import get_method, method_names
from distmerge.schedule import LinesSchedule
from distmerge.storage import Location

OUTPUT_DTYPES = ("auto", "float32", "bfloat16", "float16")


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Short name used in messages, provenance and reports (e.g. math-sft).")
    path: str = Field(description="URL of the checkpoint (local path or any fsspec URL).")
    weight: float = Field(1.0, description="Per-model weight w_i (methods that weigh inputs use it).")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(description="URL of the common base; task vectors are models minus base.")
    models: list[ModelRef] = Field(description="Fine-tuned checkpoints to merge (name, path, optional weight).")
    method: str = Field(description="Merge method; `distmerge methods` lists them.")
    params: dict[str, Any] = Field(default_factory=dict, description="Method parameters (see the method's doc).")
    output: str = Field(description="URL where the merged checkpoint is published.")
    target: str | None = Field(
        None, description="URL the merged vector is added to (default: base). Use for reasoning/skill transfer."
    )
    seed: int = Field(0, description="Seed of every random choice (DARE, DELLA masks), mixed with tensor names.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Output dtype; `auto` keeps each target tensor's dtype. Computation is always fp32."
    )
    schedule: LinesSchedule | None = Field(None, description="Optional LiNeS layer scaling of the merged vector.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for every URL (credentials belong in the environment)."
    )

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in method_names():
            raise ValueError(f"unknown method {value!r}; choose one of: {', '.join(method_names())}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        method = get_method(self.method)
        if not self.models:
            raise ValueError("models is empty; list at least one {name, path}")
        if len(self.models) < method.min_models:
            raise ValueError(f"method {self.method} needs at least {method.min_models} models, got "
                             f"{len(self.models)}; add models or choose another method")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, {duplicates} repeat; rename them")
        output = Location(self.output, self.storage_options)
        for url in {self.base, *(m.path for m in self.models), self.target or self.base}:
            if output.same_place(url):
                raise ValueError(f"output {self.output!r} is also an input ({url!r}); choose a new output URL")
        try:
            params = method.parse_params(self.params)
        except ValidationError as exc:
            raise ValueError(f"params for {self.method}: {_format_errors(exc, prefix='params')}") from None
        if method.check_weights is not None:
            method.check_weights(params, [m.weight for m in self.models])
        return self

    @property
    def target_url(self) -> str:
        return self.target or self.base

    def method_params(self):
        return get_method(self.method).parse_params(self.params)

    def canonical(self) -> dict[str, Any]:
        """Recipe with every default filled in (params included), without storage options (may hold secrets)."""
        data = self.model_dump(mode="json", exclude={"storage_options"})
        data["params"] = self.method_params().model_dump(mode="json", by_alias=True)
        data["target"] = self.target_url
        return data

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()[:16]


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping of fields (base, models, method, output, ...), "
                          f"got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {_format_errors(exc)}") from None


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML recipe from a local path or URL; `overrides` replace top-level fields (e.g. output)."""
    from distmerge.storage import Location

    text = Path(path).read_text() if Path(str(path)).exists() else Location(str(path)).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    if isinstance(data, dict) and overrides:
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return parse_recipe(data, str(path))


def _format_errors(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"])) or "recipe"
        message = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, dict) or err["type"] == "missing" else f" (got {value!r})"
        fix = _FIXES.get(err["type"], "")
        parts.append(f"field {loc}: {message}{shown}{'; ' + fix if fix else ''}")
    return "; ".join(parts)


_FIXES = {
    "missing": "add it to the recipe",
    "extra_forbidden": "remove it or check its spelling",
    "literal_error": "use one of the allowed values",
    "float_parsing": "use a number",
    "int_parsing": "use an integer",
    "finite_number": "use a finite number (not inf or nan)",
}
