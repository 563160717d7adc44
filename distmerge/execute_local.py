"""Single-process executor: the reference every distributed run is compared against, bit for bit. The Ray
executor also uses one as its start-up lane (blocks merged in the driver while the actors start)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any

import torch

from distmerge.merge_core import BlockMerger, MergeJob
from distmerge.methods.registry import PartialStats
from distmerge.plan import Block
from distmerge.staging import save_record
from distmerge.storage import Location
from distmerge.writer import ShardRecord


class LocalExecutor:
    def __init__(self, job: MergeJob, staging: Location, device: str = "cpu", threads: int = 1):
        # Like a Ray actor: `threads` blocks at once, each on one thread with one torch intra-op thread (torch
        # ops release the GIL). Outputs do not depend on either count.
        self._torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.threads = threads
        self.merger = BlockMerger(job, device)
        self.staging = staging
        self._pool: ThreadPoolExecutor | None = None

    def map_work(self, phase_index: int, stats: dict[str, Any]) -> Callable[[Block], PartialStats]:
        return lambda block: self.merger.map_block(block, phase_index, stats)

    def write_work(self, stats: dict[str, Any]) -> Callable[[Block], ShardRecord]:
        def write(block: Block) -> ShardRecord:
            record = self.merger.write_block(block, self.staging, stats)
            save_record(self.staging, record)
            return record

        return write

    def map_phase(self, phase_index: int, stats: dict[str, Any], blocks: Sequence[Block],
                  advance: Callable[[int], None]) -> dict[int, PartialStats]:
        return self._each(blocks, self.map_work(phase_index, stats), advance)

    def write_blocks(self, blocks: Sequence[Block], stats: dict[str, Any],
                     advance: Callable[[int], None]) -> dict[int, ShardRecord]:
        return self._each(blocks, self.write_work(stats), advance)

    def run_info(self) -> dict[str, int]:
        return {}

    def submit(self, work: Callable[[Block], Any], block: Block) -> Future:
        """Start `work(block)` on one of this executor's threads."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="distmerge-merge")
        return self._pool.submit(work, block)

    def _each(self, blocks: Sequence[Block], work: Callable[[Block], Any],
              advance: Callable[[int], None]) -> dict[int, Any]:
        out = {}
        if self.threads == 1:
            for block in blocks:
                out[block.id] = work(block)
                advance(block.nbytes)
            return out
        futures = {self.submit(work, block): block for block in blocks}
        for future in as_completed(futures):
            out[futures[future].id] = future.result()
            advance(futures[future].nbytes)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.merger.close()
        torch.set_num_threads(self._torch_threads)
