"""Merge worker actors: `MergeWorker`, the plain class behind each actor, and `WorkerPool`, the named actors
of a merge (or of a long-running driver's merges).

Ray stays at this edge: `MergeWorker` is a thin actor around `BlockMerger`, so the same code runs (and is
tested) without Ray. A local Ray started for a merge is lean (`local_ray`): no dashboard unless asked, a small
object store, no idle workers prestarted (each would be one more Python process of ~80 MB), one actor per
worker. Each actor merges `worker_threads(options)` blocks at once, each on one thread (a threaded actor;
torch ops release the GIL): on a local Ray the machine's cores are shared among the workers, so one worker
uses them all and two do not oversubscribe them. Block-level threads beat torch's intra-op threads here: they
also run the serial parts (reads, random numbers, histograms, sorts, hashing, writes) in parallel, and never
wait on each other inside an op.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

from distmerge.allocator import keep_freed_memory
from distmerge.faults import fault_env
from distmerge.lazy_ray import ray
from distmerge.local_ray import connect_ray
from distmerge.merge_core import BlockMerger, MergeJob
from distmerge.options import RunOptions, worker_threads
from distmerge.plan import Block
from distmerge.priority import set_process_priority, this_thread_priority
from distmerge.staging import save_record
from distmerge.storage import Location


class MergeWorker:
    """Plain class behind the actor, so the same code runs (and is tested) without Ray.

    A worker serves any number of jobs in turn (a pool outlives one merge in long-running drivers such as
    scheduled merges); it builds a job's BlockMerger on first use and drops it on `release`. Calls may run
    on several threads at once (one block each): BlockMerger keeps no state between blocks.
    """

    def __init__(self, priority: int | None = None):
        import torch

        # The driver's priority, taken up with the first block: a local Ray started in the background starts
        # its actors there too, and their start-up (importing torch) must not slow the merge the driver runs
        # meanwhile (`distmerge.startup_lane`).
        self._priority = priority
        torch.set_num_threads(1)  # parallelism comes from blocks on threads (see the module docstring)
        keep_freed_memory()  # this process exists to merge (see distmerge.allocator)
        self.jobs: dict[str, tuple[BlockMerger, Location, dict[int, Block]]] = {}
        self._lock = threading.Lock()

    def _job(self, job_id: str, job_box: list, staging: Location, device: str):
        with self._lock:
            if self._priority is not None:
                set_process_priority(self._priority)
                self._priority = None
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

    A local Ray started for the pool comes up in the background (`distmerge.local_ray.LocalRay`), started by
    the first `wait_up` if it was not yet: the actors are spawned by the first `wait_up` that finds it up, so
    a caller can work meanwhile.
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
        if self._ray.local is None:
            self.wait_up(0)  # Ray is up already: spawn the actors now (a local Ray connects when first asked)

    @property
    def local(self) -> bool:
        """Whether this pool started a local Ray of its own (its start-up is the merge's to bridge)."""
        return self._ray.local is not None

    @property
    def ray_started(self) -> bool:
        """Whether the Ray this pool runs on is up or starting (a local Ray may wait to be asked for)."""
        return self._ray.local is None or self._ray.local.started

    def wait_up(self, timeout: float | None = None) -> bool:
        """True once Ray is up and the actors are spawned (False if `timeout` seconds pass first)."""
        if not self.actors:
            if not self._ray.wait(timeout):
                return False
            self.actors = [self._spawn() for _ in range(self.options.workers)]
        return True

    @property
    def spawned(self) -> int:
        """Actors this pool has started, replacements included."""
        return self._spawned

    @property
    def answered(self) -> bool:
        """Whether an actor has answered `an_actor_ready`'s ping (asks nothing, spawns nothing)."""
        return self._answered

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
        background = self._ray.local is not None and self._ray.local.background
        return actor_cls.remote(this_thread_priority() if background else None)

    def replace(self, slot: int) -> None:
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._spawn()

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        self._ray.close()
