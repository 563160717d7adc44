"""The start-up lane: blocks merged in the driver while the Ray workers of a merge start.

A local Ray started for a merge takes seconds before its first actor can take a block (GCS, raylet and
agents start, then each actor's process imports Ray and torch: 4-6 s on 2 cores), which is as long as a
0.5B merge computes. Meanwhile the driver, which has already imported torch and planned, merges blocks
itself: one per core, with a `LocalExecutor`. It asks for Ray and actors only when the blocks it has not
started would outlast their start-up (at its pace so far; a small merge never asks, and its Ray may then never
start: see `execute_ray.RayExecutor._actors_ready`). Once an actor is ready the lane takes no new block (the
blocks it has started finish here, alongside the actors) and it is closed, its memory released for the actors.
Only for CPU merges on a local Ray started for the merge: on a cluster the driver may be a small head node,
or a laptop behind `ray://`, far from the data. Blocks are idempotent and their bytes do not depend on who
merges them, so the output is the same whatever share the lane took (`--no-merge-while-starting` turns it
off; the provenance records how many block tasks it ran).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

from distmerge.allocator import release_freed_memory
from distmerge.execute_local import LocalExecutor
from distmerge.merge_core import MergeJob
from distmerge.options import machine_cpus
from distmerge.plan import Block
from distmerge.storage import Location

log = logging.getLogger(__name__)

# How often the lane asks whether an actor is ready (an event and a `ray.wait` that does not wait).
POLL_SECONDS = 0.05


class StartupLane:
    def __init__(self, job: MergeJob, staging: Location, device: str = "cpu", threads: int | None = None):
        self.local = LocalExecutor(job, staging, device, threads or machine_cpus())
        self.blocks = 0  # block tasks run here (a block in one pass: statistics or merge)
        self._done_bytes = 0  # the lane's pace: bytes of the blocks done here, over the seconds each took
        self._block_seconds = 0.0
        self._started: dict[Future, float] = {}

    def map_work(self, phase_index: int, stats: dict[str, Any]) -> Callable[[Block], Any]:
        return self.local.map_work(phase_index, stats)

    def write_work(self, stats: dict[str, Any]) -> Callable[[Block], Any]:
        return self.local.write_work(stats)

    def run_until(self, ready: Callable[[float | None], bool], blocks: Sequence[Block],
                  work: Callable[[Block], Any], advance: Callable[[int], None],
                  ) -> tuple[dict[int, Any], dict[Future, Block]]:
        """Merge `blocks` here until `ready(seconds)` or none are left. Returns the results so far and the
        blocks still running here (finish them with `finish`); the blocks in neither are the actors' to merge.
        `ready` is asked only while blocks wait here, with how long the lane would take to merge those at its
        pace so far (None before it has finished a block): it decides whether actors are worth starting."""
        results: dict[int, Any] = {}
        running: dict[Future, Block] = {}
        queue = list(blocks)
        while queue or running:
            while queue and len(running) < self.local.threads:
                block = queue.pop(0)
                future = self.local.submit(work, block)
                running[future], self._started[future] = block, time.monotonic()
            if queue and ready(self._seconds_for(queue)):
                break
            done, _ = wait(running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in done:
                self._collect(running.pop(future), future, results, advance)
        return results, running

    def _seconds_for(self, queue: Sequence[Block]) -> float | None:
        """Seconds the lane's threads would take to merge `queue`, at the pace its blocks have taken so far."""
        if not self._done_bytes:
            return None
        return sum(block.nbytes for block in queue) * self._block_seconds / self._done_bytes / self.local.threads

    def finish(self, running: dict[Future, Block], results: dict[int, Any], advance: Callable[[int], None]) -> None:
        for future, block in running.items():
            self._collect(block, future, results, advance)

    def _collect(self, block: Block, future: Future, results: dict[int, Any], advance: Callable[[int], None]) -> None:
        results[block.id] = future.result()  # a failure here is the merge's, as in a single-process merge
        self.blocks += 1
        self._done_bytes += block.nbytes
        self._block_seconds += time.monotonic() - self._started.pop(future)
        advance(block.nbytes)

    def close(self) -> None:
        if self.blocks:
            log.info("ran %d block task(s) in this process (the start-up lane)", self.blocks)
        self.local.close()
        release_freed_memory()  # the lane's working set, for the actors
