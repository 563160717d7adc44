"""Parameter building blocks shared by the methods: the global scale and a validated density.

Every method has its own params class (so error messages name the method) built from these bases.
Validation errors are ValueErrors (pydantic wraps them in ValidationError, itself a ValueError) whose
message names the method, the bad value and a working example.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from distmerge.methods.registry import MethodParams


def invalid(method: str, problem: str, fix: str) -> ValueError:
    """A user-facing validation error: '<method>: <problem>; <fix>'."""
    return ValueError(f"{method}: {problem}; {fix}")


class ScaledParams(MethodParams):
    """Params of a method whose merged delta is multiplied by a global scale lambda."""

    method_name: ClassVar[str] = "merge"

    scale: float = Field(
        1.0,
        alias="lambda",
        allow_inf_nan=False,
        description="Global scale lambda on the merged task vector (written `lambda` in recipes).",
    )


class DensityParams(ScaledParams):
    """Adds `density`, a fraction in (0, 1]; subclasses override the default and its meaning."""

    density: float = Field(0.5, description="Fraction of entries kept, in (0, 1].")

    @field_validator("density")
    @classmethod
    def _density_in_unit_interval(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            example = cls.model_fields["density"].default
            raise invalid(
                cls.method_name, f"density must be in (0, 1], got {value}", f"use e.g. density: {example}"
            )
        return value
