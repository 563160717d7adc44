"""What is merged: per method, distmerge's params, the closest mergekit configuration, and whether the two
outputs should agree; and the targets the report checks.

`comparable` methods have the same semantics in both tools (up to documented rounding of counts), so
--compare-outputs reports how far apart their outputs are. Random methods (DARE, DELLA) draw their masks
from different RNGs, so their outputs differ entry by entry by design and are not compared.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    dm_params: dict
    mk_method: str | None  # None: mergekit has nothing close
    mk_params: dict  # top-level mergekit `parameters` (lambda, normalize, rescale, ...)
    mk_model_params: dict  # per-model mergekit parameters (weight, density, gamma, epsilon)
    mk_base: bool = True  # pass base_model to mergekit
    comparable: bool = False
    note: str = ""


RNG_NOTE = "random masks come from different RNGs (mergekit: torch's global RNG), so outputs differ by design"

METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("linear", {"normalize": True}, "linear", {"normalize": True}, {"weight": 1.0}, mk_base=False,
               comparable=True, note="weighted average of the 3 fine-tunes (base not averaged)"),
    MethodSpec("task_arithmetic", {"lambda": 0.5}, "task_arithmetic", {"lambda": 0.5}, {"weight": 1.0},
               comparable=True),
    MethodSpec("ties", {"density": 0.2, "lambda": 1.0, "trim_scope": "tensor"}, "ties",
               {"lambda": 1.0, "normalize": True}, {"weight": 1.0, "density": 0.2}, comparable=True,
               note="per-tensor top-k; k = round(d n) in distmerge vs int(d n) in mergekit, ties at the threshold "
                    "all kept in distmerge"),
    MethodSpec("dare_ties", {"density": 0.5, "lambda": 1.0, "rescale": "l1"}, "dare_ties",
               {"lambda": 1.0, "normalize": True, "rescale": True}, {"weight": 1.0, "density": 0.5},
               note=f"both L1 rescale and disjoint mean; {RNG_NOTE}"),
    MethodSpec("breadcrumbs", {"density": 0.9, "gamma": 0.01, "lambda": 1.0}, "breadcrumbs",
               {"lambda": 1.0}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}, comparable=True,
               note="band counts: round() in distmerge vs int() in mergekit; equal magnitudes at a band edge "
                    "ranked by position in distmerge, by an unstable sort in mergekit"),
    MethodSpec("della", {"density": 0.5, "epsilon": 0.15, "lambda": 1.0}, "della",
               {"lambda": 1.0, "normalize": True, "rescale": True},
               {"weight": 1.0, "density": 0.5, "epsilon": 0.15},
               note=f"distmerge divides survivors by p (the paper), mergekit L1-rescales; {RNG_NOTE}"),
    MethodSpec("ram_plus", {"rescale_factor": 1.2, "epsilon": 1e-5}, "ramplus_tl",
               {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {},
               note="closest mergekit method is ramplus_tl (per-tensor lambda, = distmerge ram_plus_tensor); "
                    "distmerge ram_plus uses whole-checkpoint counts (a statistics pass)"),
    # Not in the default list.
    MethodSpec("ram", {"epsilon": 1e-5}, "ram", {"epsilon": 1e-5}, {}, comparable=True),
    MethodSpec("ram_plus_tensor", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, "ramplus_tl",
               {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}, comparable=True),
    MethodSpec("dare_linear", {"density": 0.5, "lambda": 1.0, "rescale": "l1"}, "dare_linear",
               {"lambda": 1.0, "rescale": True}, {"weight": 1.0, "density": 0.5}, note=RNG_NOTE),
    MethodSpec("breadcrumbs_ties", {"density": 0.9, "gamma": 0.01, "lambda": 1.0}, "breadcrumbs_ties",
               {"lambda": 1.0, "normalize": True}, {"weight": 1.0, "density": 0.9, "gamma": 0.01},
               comparable=True),
    MethodSpec("della_linear", {"density": 0.5, "epsilon": 0.15, "lambda": 1.0}, "della_linear",
               {"lambda": 1.0, "rescale": True}, {"weight": 1.0, "density": 0.5, "epsilon": 0.15},
               note=f"rescale differs (1/p vs L1); {RNG_NOTE}"),
)}
DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "ram_plus")

# Targets (issue 4, item 7), on the 2-core machine, Ray start-up included.
SPEEDUP_METHODS = ("ties", "dare_ties", "breadcrumbs", "della")
SPEEDUP_TARGET = 10.0  # mergekit wall / distmerge wall, for SPEEDUP_METHODS
FLOOR_TARGET = 3.0  # distmerge wall / floor wall, every method
MEMORY_TARGET_BYTES = 1.5e9  # peak PSS of the whole process tree (see report.MEMORY_NOTE)
