"""The commands the benchmark measures, besides mergekit: distmerge, the floor and the Ray baseline.

- distmerge: `distmerge merge RECIPE --workers N --overwrite --no-progress`, defaults otherwise, as a user
  runs it (wall time includes Python start, imports and Ray start-up).
- floor: a plain loop that loads every tensor of every input (safetensors `safe_open`) and computes the
  fp32 differences to the base, writing nothing: what any merge has to do at least.
- Ray baseline: start Ray exactly as `distmerge merge --workers N` does and N idle actors that import what
  merge actors import, then stop: the fixed cost of a Ray run, without merging.

The floor and the baseline run as `python benchmarks/merge_benchmark.py floor-worker|ray-baseline-worker`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from merge_bench.family import Family
from merge_bench.specs import MethodSpec

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
ENTRY = REPO / "benchmarks" / "merge_benchmark.py"


def child_env(cache: Path) -> dict[str, str]:
    """The environment every measured command gets (network hygiene, offline, caches in the cache folder)."""
    env = dict(os.environ)
    env.update({
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(cache / "hf"),
        "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1",
    })
    env.pop("RAY_ADDRESS", None)
    return env


def snapshot_code(run_dir: Path) -> tuple[Path, str]:
    """Copy the distmerge package, so one benchmark run measures one code state even while the shared work
    tree changes; children get it first on PYTHONPATH (ahead of the editable install, Ray workers included)."""
    dst = run_dir / "snapshot"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(REPO / "distmerge", dst / "distmerge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    digest = hashlib.sha256()
    for path in sorted((dst / "distmerge").rglob("*.py")):
        digest.update(str(path.relative_to(dst)).encode() + b"\0" + path.read_bytes())
    return dst, digest.hexdigest()[:16]


def distmerge_command(spec: MethodSpec, family: Family, workers: int, out: Path, recipe: Path,
                      extra: list[str]) -> list[str]:
    import yaml

    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump({
        "base": str(family.dirs["base"]),
        "models": [{"name": role, "path": str(family.dirs[role]), "weight": 1.0} for role in family.models],
        "method": spec.name, "params": spec.dm_params, "output": str(out), "seed": 0,
    }, sort_keys=False))
    return [str(VENV_BIN / "distmerge"), "merge", str(recipe), "--workers", str(workers), "--overwrite",
            "--no-progress", *extra]


def floor_command(python: str, family: Family) -> list[str]:
    return [python, str(ENTRY), "floor-worker", str(family.dirs["base"]), *(str(family.dirs[r]) for r in family.models)]


def ray_baseline_command(python: str, workers: int) -> list[str]:
    return [python, str(ENTRY), "ray-baseline-worker", str(workers)]


def floor_worker(dirs: list[str]) -> None:
    """Load every tensor of every input and compute the fp32 differences to the base; write nothing."""
    import torch
    from safetensors import safe_open

    def locate(folder: Path) -> dict[str, Path]:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        return {name: folder / file for name, file in index["weight_map"].items()}

    base_dir, *model_dirs = [Path(d) for d in dirs]
    where = [locate(d) for d in (base_dir, *model_dirs)]
    handles = {}

    def handle(path: Path):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path]

    checksum = 0.0
    for name, path in where[0].items():
        theta0 = handle(path).get_tensor(name).to(torch.float32)
        for model in where[1:]:
            tau = handle(model[name]).get_tensor(name).to(torch.float32) - theta0
            checksum += float(tau.view(-1)[0])  # use the result, so nothing can be skipped
    print(f"floor done: {len(where[0])} tensors x {len(dirs)} inputs (checksum {checksum:.3e})")


def ray_baseline_worker(workers: int) -> None:
    """Start Ray as `distmerge merge --workers N` does, N idle actors that import torch and the merge code,
    then shut down."""
    import ray

    import distmerge
    from distmerge.local_ray import LocalRay
    from distmerge.options import RunOptions

    options = RunOptions(workers=workers)
    local = LocalRay(options, background=options.merge_while_starting)
    local.wait()

    @ray.remote(num_cpus=options.cpus_per_worker)
    class Idle:
        def ready(self) -> str:
            import distmerge.merge_core

            return distmerge.merge_core.__file__

    actors = [Idle.remote() for _ in range(workers)]
    where = ray.get([a.ready.remote() for a in actors])
    print(f"driver distmerge: {distmerge.__file__}")
    print(f"actor distmerge: {where[0]}")
    time.sleep(1.0)  # let the sampler see the steady state
    for actor in actors:
        ray.kill(actor)
    local.stop()
    print(f"ray baseline done ({workers} actors)")
