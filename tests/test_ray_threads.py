"""Threaded merge actors (a worker merging several blocks at once, as `--workers 1` does on a multi-core machine)
give the bytes of the single-process merge, statistics passes included."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from distmerge import merge_core
from distmerge.merge import run_merge
from distmerge.options import RunOptions
from distmerge.recipe import parse_recipe

CASES = [("ties", {}), ("ties", {"trim_scope": "global"}), ("dare_ties", {"rescale": "l1"}),
         ("breadcrumbs", {}), ("della", {}), ("ram_plus", {})]


def merged(family: dict, method: str, params: dict, out: Path, **options) -> dict[str, bytes]:
    models = [{"name": n, "path": family[n]} for n in ("sft-a", "sft-b", "rl-c")]
    recipe = parse_recipe({"base": family["base"], "models": models, "method": method, "params": params,
                           "output": str(out), "seed": 3})
    run_merge(recipe, RunOptions(block_size=32 * 1024, progress=False, **options))
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, namespace="distmerge-threads")
    yield
    ray.shutdown()


@pytest.mark.parametrize("method,params", CASES)
def test_threaded_actor_gives_single_process_bytes(local_ray, tiny_family, tmp_path, monkeypatch, method, params):
    # The reference merges the tiny model's large tensors in row chunks; the actor (another process) whole.
    monkeypatch.setattr(merge_core, "CHUNK_ELEMENTS", 2000)
    reference = merged(tiny_family, method, params, tmp_path / "local")
    assert len(reference) > 3  # several blocks, so the actor's threads really share the work
    got = merged(tiny_family, method, params, tmp_path / "ray", workers=1, threads_per_worker=3,
                 cpus_per_worker=0.5)
    assert got == reference
