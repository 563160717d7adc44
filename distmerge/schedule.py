"""LiNeS layer scaling (arXiv 2410.17146) as a schedule on any method's merged vector.

For transformer block l of L (1-indexed), lambda(l) = alpha + beta * (l - 1) / (L - 1): shallow blocks stay
near the target, deep blocks keep the update. Tensors outside the blocks (embeddings, final norm, lm_head)
get alpha in the official code; for LLMs that is a recipe choice (`non_block: alpha|one|zero`).
`alpha: auto` is the multi-task rule alpha = (||sum_t tau_t||_1 / ||tau_merged||_1) / T from whole-checkpoint
L1 norms: a statistics phase that runs after the method's own phases (it needs the merged vector).
The planner resolves the scale per tensor from architecture data; methods never see layers.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distmerge.methods.registry import MergeInputs, PartialStats, StatsPhase, TensorContext

AUTO_ALPHA_KEY = "lines_alpha"


class LinesSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["lines"] = Field("lines", description="Schedule kind (only LiNeS today).")
    alpha: float | Literal["auto"] = Field(0.5, description="Scale of the first block; `auto` = multi-task rule.")
    beta: float = Field(0.5, description="Added scale at the last block (single task: beta = 1 - alpha).")
    non_block: Literal["alpha", "one", "zero"] = Field(
        "alpha", description="Scale of tensors outside the blocks: alpha (official code), 1, or 0."
    )

    @model_validator(mode="after")
    def _ranges(self) -> LinesSchedule:
        if self.alpha != "auto" and not -10.0 <= float(self.alpha) <= 10.0:
            raise ValueError(f"alpha {self.alpha} is out of range [-10, 10]; use a value in [0, 1] or `auto`")
        if not -10.0 <= self.beta <= 10.0:
            raise ValueError(f"beta {self.beta} is out of range [-10, 10]; use a value in [0, 1]")
        return self

    @property
    def needs_stats(self) -> bool:
        return self.alpha == "auto"


def lines_scale(layer: int | None, num_layers: int, alpha: float, beta: float, non_block: str) -> float:
    """lambda for a tensor in 0-based block `layer` (None: outside the blocks)."""
    if layer is None:
        return {"alpha": alpha, "one": 1.0, "zero": 0.0}[non_block]
    if num_layers <= 1:
        return alpha + beta
    return alpha + beta * layer / (num_layers - 1)


def resolved_alpha(schedule: LinesSchedule, stats: dict) -> float:
    return float(stats[AUTO_ALPHA_KEY]) if schedule.alpha == "auto" else float(schedule.alpha)


def auto_alpha_phase(merge_delta, num_tasks: int) -> StatsPhase:
    """Statistics phase for `alpha: auto`. `merge_delta(inputs, ctx)` computes the method's merged vector."""

    def map_fn(inputs: MergeInputs, _params, ctx: TensorContext) -> PartialStats:
        total = torch.stack(inputs.deltas).sum(dim=0)
        merged = merge_delta(inputs, ctx)
        return {
            "sum_l1": total.abs().sum(dtype=torch.float64).reshape(1).cpu(),
            "merged_l1": merged.abs().sum(dtype=torch.float64).reshape(1).cpu(),
        }

    def finalize(summed: PartialStats, _params) -> dict:
        merged = float(summed["merged_l1"].item())
        alpha = 0.0 if merged == 0.0 else float(summed["sum_l1"].item()) / merged / num_tasks
        return {AUTO_ALPHA_KEY: alpha}

    return StatsPhase("lines_auto_alpha", map_fn, finalize)
