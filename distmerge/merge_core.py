"""The work of one block, shared by every executor: read inputs, map statistics, merge, stream a shard.

`MergeJob` is everything a worker needs (plan, indexes of every input, method, schedule), built once on the
driver and shipped once. `BlockMerger` is a plain class: the single-process executor calls it in a loop and
each Ray actor wraps one. Per tensor: inputs are read (coalesced, upcast to fp32 on the compute device),
task vectors tau_i = theta_i - theta_0 are formed, the method returns the merged vector, LiNeS scales it by
the tensor's block, and the result (target + scaled vector) is cast to the output dtype and streamed into the
block's shard. Memory is bounded by one read chunk of inputs plus one tensor's working set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from distmerge.checkpoint import CheckpointIndex
from distmerge.faults import maybe_inject
from distmerge.methods.registry import (
    MergeInputs,
    MergeMethod,
    PartialStats,
    StatsPhase,
    TensorContext,
    get_method,
)
from distmerge.methods.stats import sum_partials, with_stats
from distmerge.plan import Block, Plan, torch_dtype
from distmerge.reader import TensorReader
from distmerge.safetensors_format import ShardStream
from distmerge.schedule import LinesSchedule, auto_alpha_phase, lines_scale, resolved_alpha
from distmerge.storage import Location
from distmerge.writer import ShardRecord

# Inputs are read in chunks of about this many bytes per checkpoint: one coalesced request per file on object
# stores, while keeping memory far below a whole block.
READ_CHUNK_BYTES = 64 * 1024**2


@dataclass
class MergeJob:
    plan: Plan
    indexes: dict[str, CheckpointIndex]  # roles: base, target, model:<name>
    method_name: str
    params: dict[str, Any]
    seed: int = 0
    schedule: LinesSchedule | None = None
    weights: list[float] | None = None  # per-model w_i, in plan.model_names order (default: all 1)
    write_delta: bool = False  # True: write the (scaled) merged vector itself, not target + vector

    @property
    def method(self) -> MergeMethod:
        return get_method(self.method_name)

    def parsed_params(self):
        return self.method.parse_params(self.params)

    def phases(self) -> list[StatsPhase]:
        """Method phases, then the schedule's (auto alpha needs the merged vector, hence the method stats)."""
        params = self.parsed_params()
        phases = list(self.method.phases_for(params))
        if self.schedule is not None and self.schedule.needs_stats:
            method, names = self.method, self.plan.model_names

            def merged(inputs: MergeInputs, ctx: TensorContext) -> torch.Tensor:
                return method.merge(inputs, params, ctx)

            phases.append(auto_alpha_phase(merged, len(names)))
        return phases


class BlockMerger:
    """Computes blocks of one job on one device. No Ray here: actors wrap it."""

    def __init__(self, job: MergeJob, device: str = "cpu"):
        self.job = job
        self.device = torch.device(device)
        self.params = job.parsed_params()
        self.method = job.method
        self.phases = job.phases()
        self.readers = {role: TensorReader(idx, use_mmap=False) for role, idx in job.indexes.items()}
        self._same_target = job.indexes["target"].url == job.indexes["base"].url
        self._model_roles = [f"model:{n}" for n in job.plan.model_names]
        self._weights = [float(w) for w in (job.weights or [1.0] * len(self._model_roles))]

    # -- inputs ---------------------------------------------------------------------------------------
    def _iter_inputs(self, names: list[str]) -> Iterator[tuple[str, MergeInputs | None, torch.Tensor]]:
        """(name, fp32 inputs or None when copied, target tensor) for each name, reading in chunks."""
        plan = self.job.plan.tensors
        for chunk in _chunks(names, lambda n: plan[n].out_bytes, READ_CHUNK_BYTES):
            # Raw reads: mmap views locally, one coalesced request per file remotely. The fp32 upcast happens
            # per tensor below, so memory holds one chunk of raw bytes plus one tensor's working set.
            merged = [n for n in chunk if plan[n].merge]
            base = self.readers["base"].read(merged)
            models = [self.readers[r].read(merged) for r in self._model_roles]
            target = base if self._same_target else self.readers["target"].read(merged)
            copied = self.readers["target"].read([n for n in chunk if not plan[n].merge])
            for name in chunk:
                if not plan[name].merge:
                    yield name, None, copied[name]
                    continue
                theta0 = self._fp32(base[name])
                deltas = [self._fp32(m.pop(name)) - theta0 for m in models]
                tgt = theta0 if self._same_target else self._fp32(target.pop(name))
                yield name, MergeInputs(theta0, deltas, self._weights), tgt
                del base[name]

    def _fp32(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=torch.float32)

    def _ctx(self, name: str, stats: dict[str, Any]) -> TensorContext:
        return TensorContext(name=name, seed=self.job.seed, stats=stats)

    # -- statistics -----------------------------------------------------------------------------------
    def map_block(self, block: Block, phase_index: int, stats: dict[str, Any]) -> PartialStats:
        """Partial statistics of one phase over one block (summed over its tensors, in plan order)."""
        phase = self.phases[phase_index]
        names = [n for n in block.tensors if not self.job.plan.tensors[n].alias_of]
        partials = (
            phase.map(inputs, self.params, self._ctx(name, stats))
            for name, inputs, _ in self._iter_inputs(names) if inputs is not None
        )
        return sum_partials(partials)

    # -- merge ----------------------------------------------------------------------------------------
    def output_tensor(self, name: str, inputs: MergeInputs | None, target: torch.Tensor,
                      stats: dict[str, Any]) -> torch.Tensor:
        tp = self.job.plan.tensors[name]
        if inputs is None:
            return target
        delta = self.method.merge(inputs, self.params, with_stats(self._ctx(name, {}), stats))
        schedule = self.job.schedule
        if schedule is not None:
            alpha = resolved_alpha(schedule, stats)
            delta = delta * lines_scale(tp.layer, self.job.plan.num_layers, alpha, schedule.beta, schedule.non_block)
        out = delta if self.job.write_delta else target + delta
        return out.to(torch_dtype(tp.out_dtype)).cpu()

    def write_block(self, block: Block, staging: Location, stats: dict[str, Any]) -> ShardRecord:
        """Compute every tensor of the block and stream them into its shard under `staging`."""
        plan = self.job.plan.tensors
        specs = [(n, torch_dtype(plan[n].out_dtype), plan[n].shape) for n in block.tensors]
        sources = [n for n in block.tensors if not plan[n].alias_of]
        pending_alias: dict[str, torch.Tensor] = {}
        target_loc = staging.child(block.file)
        with target_loc.open_write() as fh:
            shard = ShardStream(fh, specs)
            produced = self._iter_inputs(sources)
            for position, name in enumerate(block.tensors):
                if position == len(block.tensors) // 2:
                    maybe_inject(block.id)  # tests only: a worker dying with half a shard written
                if plan[name].alias_of:
                    shard.write(name, pending_alias.pop(plan[name].alias_of))
                    continue
                got, inputs, target = next(produced)
                assert got == name, (got, name)
                tensor = self.output_tensor(name, inputs, target, stats)
                if any(plan[a].alias_of == name for a in block.tensors):
                    pending_alias[name] = tensor
                shard.write(name, tensor)
            size, digest = shard.finish()
        return ShardRecord(block.file, size, digest, block.tensors, block.nbytes)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def _chunks(names: list[str], size_of, limit: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    used = 0
    for name in names:
        if chunk and used + size_of(name) > limit:
            yield chunk
            chunk, used = [], 0
        chunk.append(name)
        used += size_of(name)
    if chunk:
        yield chunk


def reduce_phase(job: MergeJob, phase_index: int, partials_by_block: dict[int, PartialStats]) -> dict[str, Any]:
    """Sum block partials in block order (deterministic float sums for any worker count) and finalize."""
    phase = job.phases()[phase_index]
    summed = sum_partials(partials_by_block[i] for i in sorted(partials_by_block))
    return phase.finalize(summed, job.parsed_params())
