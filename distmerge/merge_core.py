"""The work of one block, shared by every executor: read inputs, map statistics, merge, stream a shard.

`MergeJob` is everything a worker needs (plan, indexes of every input, method, schedule), built once on the
driver and shipped once. `BlockMerger` is a plain class: the single-process executor calls it in a loop and
each Ray actor wraps one. Per tensor: inputs are read (coalesced, upcast to fp32 on the compute device),
task vectors tau_i = theta_i - theta_0 are formed, the method returns the merged vector, LiNeS scales it by
the tensor's block, and the result (target + scaled vector) is cast to the output dtype and streamed into the
block's shard. Tensors above CHUNK_ELEMENTS are merged in row chunks; methods that need whole-tensor
statistics get them from their tensor phases, run over the chunks first. Memory is bounded by one read chunk
of inputs plus one chunk's working set, whatever the tensor sizes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from distmerge.checkpoint import CheckpointIndex
from distmerge.faults import maybe_inject
from distmerge.methods import cpu_kernels
from distmerge.methods.exact import one_thread
from distmerge.methods.registry import (
    Bf16Sources,
    MergeInputs,
    MergeMethod,
    PartialStats,
    StatsPhase,
    TensorContext,
    get_method,
)
from distmerge.methods.rng import reusing_draws
from distmerge.methods.stats import chunked_tensor_stats, fold_partials, sum_partials, with_prefix_stats
from distmerge.plan import Block, Plan, torch_dtype
from distmerge.reader import TensorReader
from distmerge.safetensors_format import ShardStream
from distmerge.schedule import LinesSchedule, auto_alpha_phase, lines_scale, resolved_alpha
from distmerge.storage import Location
from distmerge.writer import ShardRecord

# Inputs are read in chunks of about this many output bytes: one coalesced request per file on object stores,
# while keeping memory far below a whole block (each input holds its raw bytes of the chunk).
READ_CHUNK_BYTES = 4 * 1024**2
# A chunked tensor whose tensor phases need several passes keeps its fp32 inputs between passes when they
# fit in this many bytes (an MLP matrix of a small model), instead of reading and subtracting them again.
TENSOR_CACHE_BYTES = 96 * 1024**2
# Tensors above this many elements are merged in row chunks when the method allows it (MergeMethod.chunking),
# so an embedding of 150k x 4k costs 2 MiB of fp32 per input and temporary at a time instead of 2.4 GiB; a
# method's working set is ten or more such tensors. Half a million elements: on the 0.5B benchmark the peak
# memory of 2 workers is ~100 MB lower than with a million, speed within run-to-run noise. A constant, not an
# option: the float sums of LiNeS' `alpha: auto` add per chunk, and outputs must not depend on run options.
CHUNK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class Piece:
    """A whole tensor, or a chunk of rows of one, with its inputs (None: copied unchanged)."""

    name: str
    inputs: MergeInputs | None
    target: torch.Tensor  # what the merged vector is added to: fp32, or bf16 as read (the output itself if copied)
    offset: int  # first element of this piece in the flattened tensor
    last: bool
    stats: dict[str, Any] = field(default_factory=dict)  # a chunk's tensor-phase results over its whole tensor


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

            phase = auto_alpha_phase(merged, len(names))
            phases.append(replace(phase, map=_one_thread(phase.map)))  # float L1 sums: see exact.one_thread
        return phases


class BlockMerger:
    """Computes blocks of one job on one device. No Ray here: actors wrap it."""

    def __init__(self, job: MergeJob, device: str = "cpu"):
        self.job = job
        self.device = torch.device(device)
        self.params = job.parsed_params()
        self.method = job.method
        self.phases = job.phases()
        # Local inputs are mapped (no copy: the kernels read the page cache) and released piece by piece.
        self.readers = {role: TensorReader(idx) for role, idx in job.indexes.items()}
        self._same_target = job.indexes["target"].url == job.indexes["base"].url
        self._model_roles = [f"model:{n}" for n in job.plan.model_names]
        self._weights = [float(w) for w in (job.weights or [1.0] * len(self._model_roles))]
        self._chunking = self.method.chunking(self.params)
        self._tensor_phases = self.method.tensor_phases(self.params)

    # -- inputs ---------------------------------------------------------------------------------------
    def _chunked(self, name: str) -> bool:
        """Large tensors are merged in row chunks when the method allows it (memory stays ~CHUNK_ELEMENTS)."""
        tp = self.job.plan.tensors[name]
        aliased = any(t.alias_of == name for t in self.job.plan.tensors.values())
        return (tp.merge and not aliased and len(tp.shape) >= 1 and math.prod(tp.shape) > CHUNK_ELEMENTS
                and self._chunking in ("elements", "rows"))

    def _iter_pieces(self, names: list[str], stats: dict[str, Any]) -> Iterator[Piece]:
        """Pieces of each tensor, in order: whole tensors (read in batches) or row chunks of large ones."""
        batch: list[str] = []
        for name in names:
            if self._chunked(name):
                yield from self._whole_pieces(batch)
                batch = []
                yield from self._chunk_pieces(name, stats)
            else:
                batch.append(name)
        yield from self._whole_pieces(batch)

    def _whole_pieces(self, names: list[str]) -> Iterator[Piece]:
        plan = self.job.plan.tensors
        for chunk in _chunks(names, lambda n: plan[n].out_bytes, READ_CHUNK_BYTES):
            # Raw reads: one coalesced request per file. The fp32 upcast happens per tensor below, so memory
            # holds one batch of raw bytes plus one tensor's working set.
            merged = [n for n in chunk if plan[n].merge]
            raw = {role: reader.read(merged) for role, reader in self._input_readers().items()}
            copied = self.readers["target"].read([n for n in chunk if not plan[n].merge])
            for name in chunk:
                if not plan[name].merge:
                    try:
                        yield Piece(name, None, copied[name], 0, True)
                    finally:
                        self.readers["target"].release(name)
                    continue
                try:
                    yield Piece(name, *self._inputs({role: t.pop(name) for role, t in raw.items()}), 0, True)
                finally:  # the consumer is done with the piece: it asks for the next or closes the generator
                    self._release(name)

    def _chunk_pieces(self, name: str, stats: dict[str, Any]) -> Iterator[Piece]:
        """Row chunks of a large tensor; with tensor phases, first run them over all chunks (one pass each;
        prefix phases ride along with the merge of the chunks)."""
        if not self._tensor_phases:
            yield from self._row_pieces(name)
            return
        copies = 1 + len(self._model_roles) + (0 if self._same_target else 1)
        cached = (list(self._row_pieces(name))
                  if 4 * copies * math.prod(self.job.plan.tensors[name].shape) <= TENSOR_CACHE_BYTES else None)

        def pieces() -> Iterator[Piece]:
            return iter(cached) if cached is not None else self._row_pieces(name)

        # With its inputs held, the tensor's random numbers are held too: drawn once for all passes (the
        # merge of each chunk runs while this generator is suspended inside the scope, on this thread).
        with reusing_draws(name) if cached is not None else contextlib.nullcontext():
            totals = chunked_tensor_stats(self._tensor_phases, self.params,
                                          lambda: ((piece.inputs, self._ctx(piece, stats)) for piece in pieces()))
            items = ((piece, piece.inputs, self._ctx(piece, stats)) for piece in pieces())
            try:
                for piece, piece_stats in with_prefix_stats(self._tensor_phases, self.params, items, totals):
                    yield replace(piece, stats=piece_stats)
            finally:
                self._release(name)  # held pieces may view pages that faulted back in during the passes

    def _row_pieces(self, name: str) -> Iterator[Piece]:
        shape = self.job.plan.tensors[name].shape
        row_elems = math.prod(shape[1:])
        rows_per_piece = max(1, CHUNK_ELEMENTS // max(1, row_elems))
        for start in range(0, shape[0], rows_per_piece):
            stop = min(shape[0], start + rows_per_piece)
            raw = {role: reader.read_rows(name, start, stop) for role, reader in self._input_readers().items()}
            try:
                yield Piece(name, *self._inputs(raw), start * row_elems, stop == shape[0])
            finally:
                self._release(name, start, stop)

    def _release(self, name: str, start: int | None = None, stop: int | None = None) -> None:
        """Unmap a consumed piece's input pages (mapped local files), so memory stays flat over the merge."""
        for reader in self._input_readers().values():
            reader.release(name, start, stop)

    def _input_readers(self) -> dict[str, TensorReader]:
        roles = ["base", *self._model_roles, *([] if self._same_target else ["target"])]
        return {role: self.readers[role] for role in roles}

    def _inputs(self, raw: dict[str, torch.Tensor]) -> tuple[MergeInputs, torch.Tensor]:
        """A piece's inputs and target. bf16 inputs stay as read: kernels form their task vectors tile by tile,
        and the fp32 forms are made only if a method asks for them (`MergeInputs.from_bf16`)."""
        base, models = raw.pop("base"), [raw.pop(role) for role in self._model_roles]
        if self.device.type == "cpu" and cpu_kernels.takes_bf16_deltas(base, models):
            inputs = MergeInputs.from_bf16(Bf16Sources(base, models), self._weights, cpu_kernels.widen)
            target = base if self._same_target else self._as_target(raw.pop("target"))
            return inputs, target
        theta0 = self._fp32(base)
        deltas = [self._delta(model, theta0) for model in models]
        target = theta0 if self._same_target else self._as_target(raw.pop("target"))
        return MergeInputs(theta0, deltas, self._weights), target

    def _as_target(self, tensor: torch.Tensor) -> torch.Tensor:
        """bf16 targets stay as read for the final add (`cpu_kernels.add_to_bf16`), others go to fp32."""
        return tensor if self.device.type == "cpu" and cpu_kernels.takes_bf16_target(tensor) else self._fp32(tensor)

    def _fp32(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=torch.float32)

    def _delta(self, tensor: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
        """fp32 tensor - theta0. A bf16/fp16 input is upcast first (exact), then subtracted: the same bits as
        torch.sub(bf16, fp32), whose mixed-dtype kernel is ~4x slower on CPU than both steps. On CPU a bf16
        input takes one fused pass (`cpu_kernels.bf16_delta`)."""
        if tensor.dtype == torch.float32:
            return torch.sub(tensor.to(self.device), theta0)  # .to may return the input itself: no in-place op
        if cpu_kernels.takes_bf16_delta(tensor, theta0):  # theta0 lives on the merge device
            return cpu_kernels.bf16_delta(tensor, theta0)
        return self._fp32(tensor).sub_(theta0)

    def _ctx(self, piece: Piece, stats: dict[str, Any]) -> TensorContext:
        numel = math.prod(self.job.plan.tensors[piece.name].shape)
        return TensorContext(name=piece.name, seed=self.job.seed, stats={**stats, **piece.stats} if piece.stats
                             else stats, offset=piece.offset, numel=numel)

    # -- statistics -----------------------------------------------------------------------------------
    def map_block(self, block: Block, phase_index: int, stats: dict[str, Any]) -> PartialStats:
        """Partial statistics of one phase over one block (summed over its tensors, in plan order)."""
        phase = self.phases[phase_index]
        names = [n for n in block.tensors if not self.job.plan.tensors[n].alias_of]
        items = ((piece.inputs, self._ctx(piece, stats))
                 for piece in self._iter_pieces(names, stats) if piece.inputs is not None)
        return fold_partials(phase, self.params, items)

    # -- merge ----------------------------------------------------------------------------------------
    def output_piece(self, piece: Piece, stats: dict[str, Any]) -> torch.Tensor:
        tp = self.job.plan.tensors[piece.name]
        if piece.inputs is None:
            return piece.target
        delta = self.method.merge(piece.inputs, self.params, self._ctx(piece, stats))
        schedule = self.job.schedule
        if schedule is not None:
            alpha = resolved_alpha(schedule, stats)
            delta = delta * lines_scale(tp.layer, self.job.plan.num_layers, alpha, schedule.beta, schedule.non_block)
        dtype, target = torch_dtype(tp.out_dtype), piece.target
        if (not self.job.write_delta and dtype == torch.bfloat16 and delta.shape == target.shape
                and cpu_kernels.enabled(delta) and (cpu_kernels.enabled(target) or cpu_kernels.takes_bf16_target(target))):
            return cpu_kernels.add_to_bf16(delta, target)  # the add (a bf16 target widened) and the rounding in one pass
        # Methods return a new tensor; a bf16 target is widened exactly by the add's type promotion.
        out = delta if self.job.write_delta else delta.add_(target)
        return out.to(dtype).cpu()

    def write_block(self, block: Block, staging: Location, stats: dict[str, Any]) -> ShardRecord:
        """Compute every tensor of the block and stream them into its shard under `staging`."""
        plan = self.job.plan.tensors
        specs = [(n, torch_dtype(plan[n].out_dtype), plan[n].shape) for n in block.tensors]
        sources = [n for n in block.tensors if not plan[n].alias_of]
        pending_alias: dict[str, torch.Tensor] = {}
        target = staging.child(block.file)
        with target.open_write() as fh:
            shard = ShardStream(fh, specs)
            pieces = self._iter_pieces(sources, stats)
            for position, name in enumerate(block.tensors):
                if position == len(block.tensors) // 2:
                    maybe_inject(block.id)  # tests only: a worker dying with half a shard written
                if plan[name].alias_of:
                    shard.write(name, pending_alias.pop(plan[name].alias_of))
                    continue
                while True:
                    piece = next(pieces)
                    assert piece.name == name, (piece.name, name)
                    tensor = self.output_piece(piece, stats)
                    shard.write_part(name, tensor)
                    if piece.last:
                        break
                if any(plan[a].alias_of == name for a in block.tensors):
                    pending_alias[name] = tensor
            pieces.close()  # releases the last piece's input pages
            size, digest = shard.finish()
        # The object's store tag once its upload has completed (on close), for the commit's check.
        return ShardRecord(block.file, size, digest, block.tensors, block.nbytes, target.version())

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


def _one_thread(fn):
    def run(*args):
        with one_thread():
            return fn(*args)

    return run


def reduce_phase(job: MergeJob, phase_index: int, partials_by_block: dict[int, PartialStats]) -> dict[str, Any]:
    """Sum block partials in block order (deterministic float sums for any worker count) and finalize."""
    phase = job.phases()[phase_index]
    summed = sum_partials(partials_by_block[i] for i in sorted(partials_by_block))
    return phase.finalize(summed, job.parsed_params())
