"""Provenance published with every merged checkpoint: what was merged, from which exact inputs, how.

`distmerge_provenance.json` holds the canonical recipe, input fingerprints, plan hash, reduced statistics
(e.g. RAM+ per-model lambda, LiNeS alpha), package versions and timings; `README.md` is a model card that a
person reads on a model hub. Storage options are never recorded (they may hold credentials).
"""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from typing import Any

import yaml

from distmerge.plan import Plan

PROVENANCE_NAME = "distmerge_provenance.json"
MODEL_CARD_NAME = "README.md"
PACKAGES = ("distmerge", "torch", "safetensors", "transformers", "ray", "fsspec")


def versions() -> dict[str, str]:
    """Package versions, and the random stream behind DARE/DELLA masks (`rng.STREAM`)."""
    from distmerge.methods.rng import STREAM

    out = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    out["mask_stream"] = STREAM
    return out


def build_provenance(recipe: dict[str, Any], plan: Plan, stats: dict[str, Any], run: dict[str, Any]) -> dict:
    return {
        "format": "distmerge-provenance/1",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": recipe,
        "plan_hash": plan.hash(),
        "inputs": plan.inputs,
        "num_blocks": len(plan.blocks),
        "output_bytes": plan.total_bytes,
        "statistics": stats,
        "run": run,
        "versions": versions(),
    }


def model_card(provenance: dict[str, Any]) -> str:
    recipe = provenance["recipe"]
    front = {
        "base_model": recipe.get("base"),
        "tags": ["merge", "distmerge", recipe.get("method")],
        "library_name": "transformers",
    }
    rows = "\n".join(f"| {m['name']} | `{m['path']}` | {m.get('weight', 1.0)} |" for m in recipe.get("models", []))
    schedule = recipe.get("schedule")
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# Merged with distmerge ({recipe.get('method')})\n\n"
        f"Base `{recipe.get('base')}`, merged vector added to `{recipe.get('target')}`.\n\n"
        f"| model | path | weight |\n| --- | --- | --- |\n{rows}\n\n"
        f"Method parameters: `{json.dumps(recipe.get('params'))}`"
        f"{'; schedule: `' + json.dumps(schedule) + '`' if schedule else ''}; seed {recipe.get('seed')}; "
        f"output dtype {recipe.get('dtype')}.\n\n"
        f"Plan `{provenance['plan_hash']}`; full provenance (input fingerprints, statistics, versions) in "
        f"`{PROVENANCE_NAME}`.\n\n```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n"
    )
