"""Registry of merge methods: pure per-tensor functions looked up by name.

A method sees one tensor at a time, already upcast to fp32: the base tensor and the task vectors
tau_i = theta_i - theta_0 of every input. It returns the merged *delta* (same shape as base, fp32).
The executor adds that delta, scaled by the layer schedule (LiNeS), to the target tensor. Working in
delta space lets the same method serve plain merges (target = base), reasoning-vector transfer and
skill-vector injection (target = another model).

Methods that need whole-checkpoint quantities (RAM+, global TIES trimming) declare statistics phases:
each phase maps over every tensor to additive partials (counts, histograms, norms), the driver sums
them, `finalize` turns the sums into the values the next phase or the merge reads from `ctx.stats`.
Methods that need whole-*tensor* quantities (per-tensor top-k, quantile bands, L1 norms) declare tensor
phases of the same shape: the executor runs them over the row chunks of a tensor too large to merge whole
and passes the results in `ctx.stats`; for a whole tensor the method runs them itself
(`stats.tensor_stats`). Their partials are integers (histograms, exact sums), so a chunked tensor gets
exactly the bytes of a whole one. No method does I/O, touches Ray, or keeps state between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict


class MethodParams(BaseModel):
    """Base class of every method's typed parameters (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


@dataclass(frozen=True)
class Bf16Sources:
    """A tensor's inputs as read, all bf16 of one shape, contiguous on CPU: tau_i = models[i] - base in fp32."""

    base: torch.Tensor
    models: list[torch.Tensor]


class MergeInputs:
    """One tensor's inputs, fp32: base theta_0, task vectors tau_i, per-model weights w_i.

    Built `from_bf16`, theta_0 and the tau_i are formed on first use: a kernel that forms each tile of a task
    vector as it reads the bf16 inputs (`bf16`) skips writing fp32 copies of every input and reading them back.
    """

    def __init__(self, base: torch.Tensor | None, deltas: list[torch.Tensor] | None, weights: list[float],
                 bf16: Bf16Sources | None = None,
                 widen: Callable[[Bf16Sources], tuple[torch.Tensor, list[torch.Tensor]]] | None = None):
        self._base, self._deltas, self.weights, self.bf16, self._widen = base, deltas, weights, bf16, widen

    @classmethod
    def from_bf16(cls, sources: Bf16Sources, weights: list[float],
                  widen: Callable[[Bf16Sources], tuple[torch.Tensor, list[torch.Tensor]]]) -> MergeInputs:
        """Inputs whose fp32 forms `widen(sources)` gives (theta_0, [tau_i]) when first asked for."""
        return cls(None, None, weights, sources, widen)

    def _formed(self) -> None:
        if self._deltas is None:
            self._base, self._deltas = self._widen(self.bf16)

    @property
    def base(self) -> torch.Tensor:
        self._formed()
        return self._base

    @property
    def deltas(self) -> list[torch.Tensor]:
        self._formed()
        return self._deltas

    @property
    def count(self) -> int:
        """How many task vectors (without forming them)."""
        return len(self.weights)

    @property
    def numel(self) -> int:
        return (self.bf16.base if self._deltas is None else self._base).numel()


@dataclass(frozen=True)
class TensorContext:
    """What a method may know beyond the tensors: the name (for seeding), the recipe seed, reduced stats."""

    name: str
    seed: int = 0
    stats: Mapping[str, Any] = field(default_factory=dict)
    # When the executor merges a large tensor in row chunks (see MergeMethod.chunking), the chunk holds
    # elements [offset, offset + chunk numel) of a tensor of `numel` elements; None: the whole tensor.
    offset: int = 0
    numel: int | None = None


PartialStats = dict[str, torch.Tensor]
MapFn = Callable[[MergeInputs, Any, TensorContext], PartialStats]
MapIntoFn = Callable[[MergeInputs, Any, TensorContext, PartialStats | None], PartialStats]
FinalizeFn = Callable[[PartialStats, Any], dict[str, Any]]
MergeFn = Callable[[MergeInputs, Any, TensorContext], torch.Tensor]


@dataclass(frozen=True)
class StatsPhase:
    """One map -> sum -> finalize pass over the whole checkpoint.

    `map` returns additive partials for one tensor (same keys and shapes for every tensor); the driver
    sums them elementwise across tensors and blocks; `finalize(summed, params)` returns the values that
    later phases and the merge read from `ctx.stats` (merged into one dict, phase after phase).
    `active(params)` says whether the phase is needed for these params (e.g. only TIES with global trimming);
    None means always. Drivers run `MergeMethod.phases_for(params)`, not `stats_phases` directly.
    """

    name: str
    map: MapFn
    finalize: FinalizeFn
    active: Callable[[Any], bool] | None = None
    # Tensor phases only: instead of the total, each row chunk receives the sum of the partials of the chunks
    # before it (`finalize` of those sums), e.g. how many entries equal to a threshold precede the chunk, to
    # break ties by flat position; its map sees the other phases' totals. The first chunk and a whole tensor
    # have nothing before them: the method treats a missing value as zero.
    prefix: bool = False
    # Optional, for partials as large as their tensor (65536-bin histograms of a row chunk): adds this tensor's
    # partials into `into` (a partial this phase returned before, owned by the caller) and returns it; None
    # allocates a new one. Summing many partials then costs no per-tensor allocation and no extra pass over
    # them. `map` must return what `map_into(..., None)` returns.
    map_into: MapIntoFn | None = None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    params_model: type[MethodParams]
    merge: MergeFn
    stats_phases: tuple[StatsPhase, ...] = ()
    min_models: int = 1
    doc: str = ""
    # Optional recipe-time check of the per-model weights (raise ValueError naming the fix), so a bad recipe
    # fails before any work instead of in the middle of a merge.
    check_weights: Callable[[Any, list[float]], None] | None = None
    # How the executor may split a large tensor to bound memory: "elements" (each entry's result depends only
    # on that entry and ctx.stats, tensor phases included), "rows" (only on its row), or "none" (on the whole
    # tensor in a way no additive statistic captures, e.g. float cosines). A callable of the params.
    chunking: Callable[[Any], str] = lambda params: "none"
    # Whole-tensor statistics these params need (see the module docstring), in order.
    tensor_phases: Callable[[Any], tuple[StatsPhase, ...]] = lambda params: ()

    def parse_params(self, raw: Mapping[str, Any] | None) -> MethodParams:
        return self.params_model.model_validate(dict(raw or {}))

    def phases_for(self, params: Any) -> tuple[StatsPhase, ...]:
        """The statistics phases these params need, in order (empty: the merge is purely per tensor)."""
        return tuple(phase for phase in self.stats_phases if phase.active is None or phase.active(params))


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    _load_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown merge method {name!r}; choose one of: {known}") from None


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def _load_builtin_methods() -> None:
    # Importing the package registers every built-in method exactly once.
    import distmerge.methods  # noqa: F401
