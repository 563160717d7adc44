"""Ray executor: named actors own blocks, read their own byte ranges and write their own shards.

Ray stays at this edge: `MergeWorker` is a thin actor around `BlockMerger`. The job (plan + indexes) is put
in the object store once; each task carries a block id and returns a small manifest (partial statistics or
a shard record), never tensors. The driver gives each actor a block per thread, plus `in_flight_per_worker`
queued ahead while more than a round of blocks is left (`ray.wait`, no `ray.get` in a loop). When an actor
dies (process killed, node lost) its in-flight blocks are requeued on a replacement actor; blocks are
idempotent (a retried shard is rewritten from scratch under the staging prefix), so the output is
byte-identical whatever failed.

A local Ray started for a merge is lean (`local_ray`): no dashboard unless asked, a small object store, no
idle workers prestarted (each would be one more Python process of ~80 MB), one actor per worker. Each
actor merges `worker_threads(options)` blocks at once, each on one thread (a threaded actor; torch ops
release the GIL): on a local Ray the machine's cores are shared among the workers, so one worker uses them
all and two do not oversubscribe them. Block-level threads beat torch's intra-op threads here: they also
run the serial parts (reads, random numbers, histograms, sorts, hashing, writes) in parallel, and never
wait on each other inside an op.

While a local Ray started for the merge comes up (on its own thread, `local_ray.LocalRay`), the driver
merges blocks itself until the first actor is ready (`startup_lane`); the actors take the rest.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray

from distmerge.allocator import keep_freed_memory
from distmerge.errors import MergeError
from distmerge.faults import fault_env
from distmerge.local_ray import connect_ray
from distmerge.merge_core import BlockMerger, MergeJob
from distmerge.methods.registry import PartialStats
from distmerge.options import RunOptions, worker_threads
from distmerge.plan import Block
from distmerge.staging import save_record
from distmerge.startup_lane import StartupLane
from distmerge.storage import Location
from distmerge.writer import ShardRecord

log = logging.getLogger(__name__)

class BlockTimeout(Exception):
    """A block ran past RunOptions.block_timeout: its worker is presumed hung."""


class MergeWorker:
    """Plain class behind the actor, so the same code runs (and is tested) without Ray.

    A worker serves any number of jobs in turn (a pool outlives one merge in long-running drivers such as
    scheduled merges); it builds a job's BlockMerger on first use and drops it on `release`. Calls may run
    on several threads at once (one block each): BlockMerger keeps no state between blocks.
    """

    def __init__(self):
        import torch

        torch.set_num_threads(1)  # parallelism comes from blocks on threads (see the module docstring)
        keep_freed_memory()  # this process exists to merge (see distmerge.allocator)
        self.jobs: dict[str, tuple[BlockMerger, Location, dict[int, Block]]] = {}
        self._lock = threading.Lock()

    def _job(self, job_id: str, job_box: list, staging: Location, device: str):
        with self._lock:
            if job_id not in self.jobs:
                job: MergeJob = ray.get(job_box[0])  # boxed: Ray resolves it here once, not on every call
                self.jobs[job_id] = (BlockMerger(job, device), staging, {b.id: b for b in job.plan.blocks})
            return self.jobs[job_id]

    def map_block(self, job_id, job_box, staging, device, block_id, phase_index, stats):
        merger, _, blocks = self._job(job_id, job_box, staging, device)
        return block_id, merger.map_block(blocks[block_id], phase_index, stats)

    def write_block(self, job_id, job_box, staging, device, block_id, stats):
        merger, staging, blocks = self._job(job_id, job_box, staging, device)
        record = merger.write_block(blocks[block_id], staging, stats)
        save_record(staging, record)
        return block_id, record

    def release(self, job_id: str) -> None:
        entry = self.jobs.pop(job_id, None)
        if entry is not None:
            entry[0].close()

    def where(self) -> dict[str, Any]:
        """Where this actor runs: process, node, the GPUs Ray gave it and whether torch sees CUDA there."""
        import torch

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "gpus": [str(gpu) for gpu in ray.get_gpu_ids()], "cuda": torch.cuda.is_available()}


class WorkerPool:
    """Named merge actors on the cluster. One per merge by default; long-running drivers keep one open.

    A local Ray started for the pool comes up on its own thread (`distmerge.local_ray.LocalRay`): the actors
    are spawned by the first `wait_up` that finds it up, so a caller can work meanwhile.
    """

    def __init__(self, options: RunOptions, device: str):
        self.options = options
        self.device = device
        self._ray = connect_ray(options)
        self.threads = worker_threads(options, local=self._ray.local is not None)
        self.pool_id = uuid.uuid4().hex[:8]
        self._spawned = 0
        self.actors: list = []
        self._pings: list = []
        self._answered = False
        self.wait_up(0)

    @property
    def local(self) -> bool:
        """Whether this pool started a local Ray of its own (its start-up is the merge's to bridge)."""
        return self._ray.local is not None

    def wait_up(self, timeout: float | None = None) -> bool:
        """True once Ray is up and the actors are spawned (False if `timeout` seconds pass first)."""
        if not self.actors:
            if not self._ray.wait(timeout):
                return False
            self.actors = [self._spawn() for _ in range(self.options.workers)]
        return True

    def an_actor_ready(self) -> bool:
        """Whether an actor has answered yet (does not wait; spawns the actors if Ray has come up)."""
        if not self._answered and self.wait_up(0):
            self._pings = self._pings or [actor.where.remote() for actor in self.actors]
            self._answered = bool(ray.wait(self._pings, num_returns=1, timeout=0)[0])
        return self._answered

    def _spawn(self):
        resources = {"num_cpus": self.options.cpus_per_worker}
        if self.device == "cuda":
            resources["num_gpus"] = self.options.gpus_per_worker
        name = f"distmerge-{self.pool_id}-worker-{self._spawned}"
        self._spawned += 1
        env = fault_env()
        actor_cls = ray.remote(MergeWorker).options(
            name=name, namespace="distmerge", scheduling_strategy="SPREAD", max_restarts=0,
            max_concurrency=self.threads, runtime_env={"env_vars": env} if env else None, **resources,
        )
        return actor_cls.remote()

    def replace(self, slot: int) -> None:
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._spawn()

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        self._ray.close()


def dispatch_slots(load: dict[int, int], queued: int, threads: int, ahead: int) -> list[int]:
    """The actor slots that the next queued blocks go to, in queue order (updates `load`, blocks per slot).

    Breadth first: every actor gets a block for each of its threads; `ahead` more are queued on an actor (so
    a thread that finishes starts the next at once) only while more than a round of blocks is left. The last
    round goes to whichever thread frees up first: queued ahead, a block could wait behind a slow one while
    another worker idles.
    """
    slots = []
    for depth in (threads, threads + ahead):
        for slot in sorted(load, key=lambda s: load[s]):
            while len(slots) < queued and load[slot] < depth and (
                    depth == threads or queued - len(slots) > threads * len(load)):
                slots.append(slot)
                load[slot] += 1
    return slots


class RayExecutor:
    def __init__(self, job: MergeJob, staging: Location, options: RunOptions, device: str,
                 pool: WorkerPool | None = None):
        self.options = options
        self.pool = pool or WorkerPool(options, device)
        self._own_pool = pool is None
        self.device = device
        self.staging = staging
        self.job = job
        self.job_id = f"{job.plan.hash()}-{uuid.uuid4().hex[:6]}"
        self.job_box: list | None = None  # the job in Ray's object store, once Ray is up
        self.slots: list[int] = []
        self.lane: StartupLane | None = None
        self._lane_tasks = 0
        self.tasks = 0  # blocks run, summed over passes (statistics passes and the merge)
        if options.merge_while_starting and device == "cpu" and self.pool.local and not self.pool.an_actor_ready():
            self.lane = StartupLane(job, staging, device)

    def _up(self, timeout: float | None = None) -> bool:
        """Ray up, actors spawned and the job shipped (False if `timeout` passes first)."""
        if self.job_box is None:
            if not self.pool.wait_up(timeout):
                return False
            self.job_box = [ray.put(self.job)]
            self.slots = list(range(min(self.options.workers, len(self.pool.actors))))
        return True

    # -- the two kinds of pass --------------------------------------------------------------------------
    def map_phase(self, phase_index: int, stats: dict[str, Any], blocks: Sequence[Block],
                  advance: Callable[[int], None]) -> dict[int, PartialStats]:
        def make_submit():
            stats_ref = ray.put(stats)
            return lambda actor, b: actor.map_block.remote(
                self.job_id, self.job_box, self.staging, self.device, b.id, phase_index, stats_ref)

        lane_work = self.lane.map_work(phase_index, stats) if self.lane else None
        return self._pass(blocks, lane_work, make_submit, advance)

    def write_blocks(self, blocks: Sequence[Block], stats: dict[str, Any],
                     advance: Callable[[int], None]) -> dict[int, ShardRecord]:
        def make_submit():
            stats_ref = ray.put(stats)
            return lambda actor, b: actor.write_block.remote(
                self.job_id, self.job_box, self.staging, self.device, b.id, stats_ref)

        lane_work = self.lane.write_work(stats) if self.lane else None
        return self._pass(blocks, lane_work, make_submit, advance)

    def _pass(self, blocks: Sequence[Block], lane_work, make_submit, advance: Callable[[int], None]) -> dict[int, Any]:
        """One pass over `blocks`: the start-up lane's share while no actor is ready, then the actors' (once
        Ray is up, `make_submit()` gives the function that submits a block to an actor)."""
        self.tasks += len(blocks)
        results: dict[int, Any] = {}
        running: dict = {}
        if self.lane is not None:
            results, running = self.lane.run_until(self.pool.an_actor_ready, blocks, lane_work, advance)
        taken = results.keys() | {block.id for block in running.values()}
        rest = [block for block in blocks if block.id not in taken]
        try:
            if rest:
                self._up()
                results.update(self._run(rest, make_submit(), advance))
        finally:
            if self.lane is not None:
                self.lane.finish(running, results, advance)  # its last blocks ran alongside the actors
        if self.lane is not None and self.pool.an_actor_ready():
            self._retire_lane()
        return results

    def run_info(self) -> dict[str, int]:
        """For the provenance: block tasks (a block in one pass) run, and how many the start-up lane ran. Read
        while `close` may be retiring the lane on another thread."""
        lane = self.lane
        return {"block_tasks": self.tasks,
                "block_tasks_in_driver_while_ray_started": lane.blocks if lane is not None else self._lane_tasks}

    def _retire_lane(self) -> None:
        lane = self.lane
        if lane is not None:
            self._lane_tasks = lane.blocks
            self.lane = None
            lane.close()

    def _run(self, blocks: Sequence[Block], submit, advance: Callable[[int], None]) -> dict[int, Any]:
        """Dynamic queue over actors with bounded in-flight work; dead actors are replaced, blocks retried."""
        queue = list(blocks)
        attempts = {b.id: 0 for b in blocks}
        in_flight: dict[Any, tuple[int, Block]] = {}  # ref -> (actor slot, block)
        started: dict[Any, float] = {}
        load = dict.fromkeys(self.slots, 0)
        results: dict[int, Any] = {}
        while queue or in_flight:
            for slot in dispatch_slots(load, len(queue), self.pool.threads, self.options.in_flight_per_worker):
                block = queue.pop(0)
                ref = submit(self.pool.actors[slot], block)
                in_flight[ref], started[ref] = (slot, block), time.monotonic()
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=self._wait_timeout())
            if not ready:
                self._replace_hung(in_flight, started, attempts, queue, load)
                continue
            ref = ready[0]
            slot, block = in_flight.pop(ref)
            load[slot] -= 1
            try:
                block_id, value = ray.get(ref)
            except ray.exceptions.RayError as exc:
                self._recover(slot, block, exc, attempts, queue, in_flight, load)
                continue
            results[block_id] = value
            advance(block.nbytes)
        return results

    def _wait_timeout(self) -> float | None:
        # Poll often enough to notice a block that has run past block_timeout.
        return None if self.options.block_timeout is None else min(5.0, self.options.block_timeout / 4)

    def _replace_hung(self, in_flight, started, attempts, queue, load) -> None:
        now = time.monotonic()
        for ref, (slot, block) in list(in_flight.items()):
            if ref in in_flight and now - started[ref] > self.options.block_timeout:
                in_flight.pop(ref)
                load[slot] -= 1
                exc = BlockTimeout(f"block {block.id} ran past block_timeout={self.options.block_timeout}s")
                self._recover(slot, block, exc, attempts, queue, in_flight, load)

    def _recover(self, slot, block, exc, attempts, queue, in_flight, load) -> None:
        if not isinstance(exc, (BlockTimeout, ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError,
                                ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                                ray.exceptions.ObjectLostError)):
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, Exception) else MergeError(f"block {block.id} failed: {exc}")) from exc
        attempts[block.id] += 1
        if attempts[block.id] > self.options.max_retries:
            raise MergeError(f"block {block.id} ({block.file}) failed {attempts[block.id]} times; last error: "
                             f"{exc}. Fix: check worker logs, then rerun with --resume") from exc
        log.warning("worker %d lost (%s); retrying block %d on a new worker", slot, type(exc).__name__, block.id)
        queue.insert(0, block)
        # The actor is gone: everything it still had queued comes back too.
        for ref, (other_slot, other_block) in list(in_flight.items()):
            if other_slot == slot:
                del in_flight[ref]
                queue.insert(0, other_block)
        load[slot] = 0
        self.pool.replace(slot)

    def close(self) -> None:
        self._retire_lane()
        if self._own_pool:
            self.pool.close()
            return
        for slot in self.slots:
            try:
                self.pool.actors[slot].release.remote(self.job_id)
            except ray.exceptions.RayError:
                pass
