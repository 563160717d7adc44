"""Single-process executor: the reference every distributed run is compared against, bit for bit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from distmerge.merge_core import BlockMerger, MergeJob
from distmerge.methods.registry import PartialStats
from distmerge.plan import Block
from distmerge.staging import save_record
from distmerge.storage import Location
from distmerge.writer import ShardRecord


class LocalExecutor:
    def __init__(self, job: MergeJob, staging: Location, device: str = "cpu"):
        # Reductions (norms, cosines, sums) split work by thread, so their float results depend on the thread
        # count. Every executor computes with one intra-op thread so outputs are bit-identical for any number
        # of workers; parallelism comes from workers.
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.merger = BlockMerger(job, device)
        self.staging = staging

    def map_phase(self, phase_index: int, stats: dict[str, Any], blocks: Sequence[Block],
                  advance: Callable[[int], None]) -> dict[int, PartialStats]:
        out = {}
        for block in blocks:
            out[block.id] = self.merger.map_block(block, phase_index, stats)
            advance(block.nbytes)
        return out

    def write_blocks(self, blocks: Sequence[Block], stats: dict[str, Any],
                     advance: Callable[[int], None]) -> dict[int, ShardRecord]:
        out = {}
        for block in blocks:
            record = self.merger.write_block(block, self.staging, stats)
            save_record(self.staging, record)
            out[block.id] = record
            advance(block.nbytes)
        return out

    def close(self) -> None:
        self.merger.close()
        torch.set_num_threads(self._threads)
