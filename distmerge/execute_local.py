"""Single-process executor: the reference every distributed run is compared against, bit for bit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
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

    def map_phase(self, phase_index: int, stats: dict[str, Any], blocks: Sequence[Block],
                  advance: Callable[[int], None]) -> dict[int, PartialStats]:
        return self._each(blocks, lambda block: self.merger.map_block(block, phase_index, stats), advance)

    def write_blocks(self, blocks: Sequence[Block], stats: dict[str, Any],
                     advance: Callable[[int], None]) -> dict[int, ShardRecord]:
        def write(block: Block) -> ShardRecord:
            record = self.merger.write_block(block, self.staging, stats)
            save_record(self.staging, record)
            return record

        return self._each(blocks, write, advance)

    def _each(self, blocks: Sequence[Block], work: Callable[[Block], Any],
              advance: Callable[[int], None]) -> dict[int, Any]:
        out = {}
        if self.threads == 1:
            for block in blocks:
                out[block.id] = work(block)
                advance(block.nbytes)
            return out
        with ThreadPoolExecutor(self.threads) as pool:
            futures = {pool.submit(work, block): block for block in blocks}
            for future in as_completed(futures):
                out[futures[future].id] = future.result()
                advance(futures[future].nbytes)
        return out

    def close(self) -> None:
        self.merger.close()
        torch.set_num_threads(self._torch_threads)
