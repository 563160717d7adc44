"""Parameters of the generalized task arithmetic methods (`distmerge.methods.generalized`): validated pydantic
models whose errors name the bad value and the fix."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from distmerge.methods import sparsify
from distmerge.methods.params import DensityParams, ScaledParams, invalid


class TaskArithmeticParams(ScaledParams):
    method_name: ClassVar[str] = "task_arithmetic"


class TiesParams(DensityParams):
    method_name: ClassVar[str] = "ties"

    density: float = Field(0.2, description="Fraction of each task vector kept by magnitude, in (0, 1].")
    trim_scope: Literal["tensor", "global"] = Field(
        "tensor",
        description="`tensor`: top-k per tensor (common tools); `global`: top-k over the whole checkpoint "
        "per model (the paper; needs two statistics passes).",
    )


class DareParams(DensityParams):
    density: float = Field(0.5, description="Keep probability p of each entry, in (0, 1].")
    rescale: sparsify.DareRescale = Field(
        "inverse_p",
        description="`inverse_p`: kept entries / p (the paper); `l1`: match the L1 norm of the original tau_i.",
    )


class DareLinearParams(DareParams):
    method_name: ClassVar[str] = "dare_linear"


class DareTiesParams(DareParams):
    method_name: ClassVar[str] = "dare_ties"


class BreadcrumbsParams(DensityParams):
    method_name: ClassVar[str] = "breadcrumbs"

    density: float = Field(0.9, description="Fraction of entries kept per tensor, in (0, 1].")
    gamma: float = Field(
        0.01, description="Fraction of largest-magnitude entries (outliers) dropped, in [0, 1)."
    )

    @model_validator(mode="after")
    def _fractions_fit(self) -> BreadcrumbsParams:
        if not 0.0 <= self.gamma < 1.0:
            raise invalid(
                self.method_name, f"gamma must be in [0, 1), got {self.gamma}", "use e.g. gamma: 0.01"
            )
        if self.density + self.gamma > 1.0 + 1e-9:
            raise invalid(
                self.method_name,
                f"density + gamma must be <= 1, got {self.density} + {self.gamma}",
                "lower density or gamma, e.g. density: 0.9, gamma: 0.01",
            )
        return self


class BreadcrumbsTiesParams(BreadcrumbsParams):
    method_name: ClassVar[str] = "breadcrumbs_ties"


class DellaParams(DensityParams):
    method_name: ClassVar[str] = "della"

    density: float = Field(0.5, description="Mean keep probability d, in (0, 1].")
    epsilon: float = Field(
        0.15, description="Spread eps of keep probabilities: from d - eps to d + eps by rank."
    )

    @model_validator(mode="after")
    def _probabilities_valid(self) -> DellaParams:
        if not (
            self.epsilon >= 0.0 and self.density - self.epsilon > 0.0 and self.density + self.epsilon <= 1.0
        ):
            raise invalid(
                self.method_name,
                f"need epsilon >= 0, density - epsilon > 0 and density + epsilon <= 1, "
                f"got density {self.density}, epsilon {self.epsilon}",
                "use e.g. density: 0.5, epsilon: 0.15",
            )
        return self


class DellaLinearParams(DellaParams):
    method_name: ClassVar[str] = "della_linear"
