"""Ray executor: named actors (`distmerge.worker_pool`) own blocks, read their own byte ranges and write their own
shards.

The job (plan + indexes) is put in the object store once; each task carries a block id and returns a small
manifest (partial statistics or a shard record), never tensors. The driver gives each actor a block per thread,
plus `in_flight_per_worker` queued ahead while more than a round of blocks is left (`ray.wait`, no `ray.get` in
a loop). When an actor dies (process killed, node lost) its in-flight blocks are requeued on a replacement
actor; blocks are idempotent (a retried shard is rewritten from scratch under the staging prefix), so the
output is byte-identical whatever failed.

While a local Ray started for the merge comes up (`local_ray.LocalRay`), the driver merges blocks itself
(`startup_lane`); once Ray is up and the blocks left would outlast an actor's start-up, actors are started and
take the rest when ready. A CPU merge's local Ray itself is started only when the blocks left would also
outlast its start-up, so a merge the driver finishes first never starts it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from distmerge.errors import MergeError
from distmerge.lazy_ray import ray
from distmerge.merge_core import MergeJob
from distmerge.methods.registry import PartialStats
from distmerge.options import RunOptions
from distmerge.plan import Block
from distmerge.startup_lane import StartupLane
from distmerge.storage import Location
from distmerge.worker_pool import WorkerPool
from distmerge.writer import ShardRecord

log = logging.getLogger(__name__)


# About how long a merge actor takes to start on a local Ray (a Python process importing Ray and torch, in
# the background while the start-up lane merges): the lane hands over only blocks that would outlast it.
ACTOR_START_SECONDS = 5.0
# About how long a local Ray's head takes to come up in the background while the lane merges (2 cores): a
# local Ray not started yet is started only for blocks that would outlast it and then an actor's start-up.
RAY_START_SECONDS = 3.0


class BlockTimeout(Exception):
    """A block ran past RunOptions.block_timeout: its worker is presumed hung."""


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
        if options.merge_while_starting and device == "cpu" and self.pool.local and not self.pool.answered:
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
            results, running = self.lane.run_until(self._actors_ready, blocks, lane_work, advance)
        taken = results.keys() | {block.id for block in running.values()}
        rest = [block for block in blocks if block.id not in taken]
        try:
            if rest:
                self._up()
                results.update(self._run(rest, make_submit(), advance))
        finally:
            if self.lane is not None:
                self.lane.finish(running, results, advance)  # its last blocks ran alongside the actors
        if self.lane is not None and self.pool.answered:
            self._retire_lane()
        return results

    def _actors_ready(self, lane_seconds: float | None) -> bool:
        """Whether the actors take the blocks the lane has not started. They are started (and the driver
        connected to Ray) only once Ray is up and those blocks would keep the lane busy for longer than an
        actor takes to start: on the cores the lane already uses, an actor merges no faster, so one that starts
        after the lane has started every block only costs its start-up. A local Ray that waits to be asked for
        (`local_ray.lane_expected`) is started only if they would also outlast its own start-up: a small merge
        starts neither Ray nor an actor."""
        if not self.pool.actors:
            needed = ACTOR_START_SECONDS + (0.0 if self.pool.ray_started else RAY_START_SECONDS)
            if lane_seconds is None or lane_seconds < needed:
                return False
        return self.pool.an_actor_ready()

    def run_info(self) -> dict[str, int]:
        """For the provenance: block tasks (a block in one pass) run, how many the start-up lane ran in the
        driver, whether Ray was started (a local Ray the lane never asked for was not) and how many actors the
        pool has started (replacements included). Read while `close` may be retiring the lane on another
        thread."""
        lane = self.lane
        return {"block_tasks": self.tasks,
                "block_tasks_in_driver": lane.blocks if lane is not None else self._lane_tasks,
                "ray_started": self.pool.ray_started, "actors_started": self.pool.spawned}

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
