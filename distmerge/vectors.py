"""Task, reasoning and skill vectors as checkpoint-shaped artifacts, and the statistics read before merging.

`extract_vector(A, B, out)` writes A - B (computed in fp32) as a safetensors checkpoint with the same names,
through the same planned, staged, atomic path as a merge. `vector_stats(urls)` reports per tensor kind
(attention, MLP, embeddings, norms) the L1/L2 norms, the fraction of active entries (|delta| > eps) and the
pairwise overlap of active entries between vectors: sparse, barely overlapping vectors (typical of RL) are
where RAM/RAM+ beat TIES-style sign election.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from distmerge.architecture import tensor_kind
from distmerge.checkpoint import CheckpointIndex
from distmerge.plan import check_compatible
from distmerge.reader import TensorReader

ACTIVE_EPS = 1e-5


def extract_vector(a: str, b: str, out: str, *, dtype: str = "float32", storage_options: dict | None = None,
                   options=None):
    """Write a - b to `out`. Returns the MergeResult (plan hash, shards, seconds)."""
    from distmerge.merge import run_merge
    from distmerge.recipe import parse_recipe

    recipe = parse_recipe({
        "base": b, "models": [{"name": "vector", "path": a}], "method": "task_arithmetic", "output": out,
        "dtype": dtype, "storage_options": storage_options or {},
    }, source="vector extract")
    return run_merge(recipe, options, write_delta=True)


@dataclass
class KindStats:
    numel: int = 0
    l1: float = 0.0
    sq: float = 0.0
    active: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"numel": self.numel, "l1": self.l1, "l2": math.sqrt(self.sq),
                "active_fraction": self.active / self.numel if self.numel else 0.0}


@dataclass
class VectorStats:
    names: list[str]
    per_vector: dict[str, dict[str, KindStats]] = field(default_factory=dict)
    overlap: dict[tuple[str, str], dict[str, list[int]]] = field(default_factory=dict)  # kind -> [both, either]

    def to_json(self) -> dict[str, Any]:
        return {
            "vectors": {v: {k: s.as_dict() for k, s in kinds.items()} for v, kinds in self.per_vector.items()},
            "overlap": {f"{a} vs {b}": {k: {"both": both, "either": either,
                                               "jaccard": both / either if either else 0.0}
                                           for k, (both, either) in kinds.items()}
                        for (a, b), kinds in self.overlap.items()},
        }


def vector_stats(urls: list[str], *, base: str | None = None, eps: float = ACTIVE_EPS,
                 storage_options: dict | None = None) -> VectorStats:
    """Stats of vector artifacts, or of (url - base) when `base` is given. Streams tensor by tensor."""
    indexes = [CheckpointIndex.load(u, storage_options) for u in urls]
    base_index = CheckpointIndex.load(base, storage_options) if base else None
    names = [u.rstrip("/").rsplit("/", 1)[-1] or u for u in urls]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    reference = indexes[0]
    roles = {f"model:{idx.url}": idx for idx in indexes}
    check_compatible({**roles, **({"base": base_index} if base_index else {})}, same_dtypes=False)
    readers = [TensorReader(i) for i in indexes]
    base_reader = TensorReader(base_index) if base_index else None
    result = VectorStats(names, {n: defaultdict(KindStats) for n in names}, {})
    for tensor_name in reference.names:
        if not reference.tensors[tensor_name].torch_dtype.is_floating_point:
            continue
        kind = tensor_kind(tensor_name)
        theta0 = base_reader.read([tensor_name], dtype=torch.float32)[tensor_name] if base_reader else None
        masks = []
        for vec_name, reader in zip(names, readers, strict=True):
            delta = reader.read([tensor_name], dtype=torch.float32)[tensor_name]
            if theta0 is not None:
                delta = delta - theta0
            mask = delta.abs() > eps
            acc = result.per_vector[vec_name][kind]
            acc.numel += delta.numel()
            acc.l1 += float(delta.abs().sum(dtype=torch.float64))
            acc.sq += float(delta.double().square().sum())
            acc.active += int(mask.sum())
            masks.append(mask)
        for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
            pair = result.overlap.setdefault((a, b), defaultdict(lambda: [0, 0]))
            pair[kind][0] += int((masks[i] & masks[j]).sum())
            pair[kind][1] += int((masks[i] | masks[j]).sum())
    for vec_name in names:  # an "all" row per vector
        kinds = result.per_vector[vec_name]
        kinds["all"] = KindStats(sum(s.numel for s in kinds.values()), sum(s.l1 for s in kinds.values()),
                                 sum(s.sq for s in kinds.values()), sum(s.active for s in kinds.values()))
    for kinds in result.overlap.values():
        kinds["all"] = [sum(v[0] for v in kinds.values()), sum(v[1] for v in kinds.values())]
    return result


def format_stats(stats: VectorStats) -> str:
    lines = [f"{'vector':<24} {'kind':<10} {'params':>12} {'L1':>12} {'L2':>10} {'active':>8}"]
    for vec, kinds in stats.per_vector.items():
        for kind, s in sorted(kinds.items(), key=lambda kv: (kv[0] == "all", kv[0])):
            d = s.as_dict()
            lines.append(f"{vec:<24} {kind:<10} {s.numel:>12,} {d['l1']:>12.4g} {d['l2']:>10.4g} "
                         f"{100 * d['active_fraction']:>7.2f}%")
    if stats.overlap:
        lines.append("")
        lines.append(f"{'pair':<40} {'kind':<10} {'both active':>12} {'jaccard':>8}")
        for (a, b), kinds in stats.overlap.items():
            for kind, (both, either) in sorted(kinds.items(), key=lambda kv: (kv[0] == "all", kv[0])):
                lines.append(f"{a + ' vs ' + b:<40} {kind:<10} {both:>12,} {both / either if either else 0:>8.3f}")
    return "\n".join(lines)
