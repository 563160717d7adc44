"""Run options: how to execute a recipe (workers, block size, device), as opposed to what to merge.

CLI flags of `distmerge merge` derive from these fields, so each setting is defined and documented once.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Output bytes per block (= per output shard) unless --block-size says otherwise.
DEFAULT_BLOCK_SIZE = 256 * 1024**2


class RunOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int = Field(0, ge=0, description="Ray worker actors; 0 merges in this process without Ray.")
    address: str | None = Field(None, description="Ray cluster address (e.g. auto, ray://host:10001); "
                                "default starts a local Ray.")
    block_size: int = Field(DEFAULT_BLOCK_SIZE, gt=0, description="Target output bytes per block (= per output shard).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Compute device; auto uses a GPU when present.")
    resume: bool = Field(False, description="Reuse staged shards of an interrupted merge whose checksums verify.")
    overwrite: bool = Field(False, description="Replace a committed checkpoint at the output URL.")
    verify: Literal["checksum", "size"] = Field(
        "checksum", description="How staged shards are checked before commit and on resume: size and content "
        "(the xxh3-128 checksum, read back in full; on object stores the ETag/generation the object had when its "
        "worker wrote it, one metadata request), or size only.")
    progress: bool = Field(True, description="Show a progress bar on the driver.")
    in_flight_per_worker: int = Field(1, ge=0, description="Blocks queued on each worker beyond one per thread, "
                                      "while more than a round of blocks is left (none for the last round, so "
                                      "it goes to whichever worker frees up first).")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs each worker reserves (fractions allowed).")
    threads_per_worker: int | None = Field(
        None, ge=1, description="Blocks each worker merges at once, one thread each (outputs do not depend on "
        "it). Default: with a local Ray, this machine's cores shared among the workers; on a cluster, the CPUs "
        "each worker reserves (at least 1); without Ray, 1.")
    dashboard: bool = Field(False, description="Start the Ray dashboard (127.0.0.1:8265) with a local Ray; off by "
                            "default to save its memory and start-up time.")
    merge_while_starting: bool = Field(
        True, description="While a local Ray started for the merge comes up (seconds), merge blocks in this "
        "process until the first worker is ready; outputs do not depend on it. CPU merges only.")
    gpus_per_worker: float = Field(1.0, ge=0, description="Ray GPUs each worker reserves when the device is cuda.")
    max_retries: int = Field(3, ge=0, description="Times a block is retried after its worker dies.")
    block_timeout: float | None = Field(
        None, gt=0, description="Seconds after which a block's worker is presumed hung, replaced, and the block "
        "retried (default: wait; a dead worker or node is detected by Ray either way)."
    )

    @field_validator("verify", mode="before")
    @classmethod
    def _sha256_is_checksum(cls, value):
        return "checksum" if value == "sha256" else value  # the name this setting had before xxh3-128


def machine_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_threads(options: RunOptions, local: bool) -> int:
    """Threads (blocks at once) of each worker: as set, else the cores shared among the actors of a local Ray,
    else the CPUs an actor reserves on a cluster. Without Ray (workers 0) the merge runs in the caller's
    process, which may have other work: one unless asked."""
    if options.threads_per_worker is not None:
        return options.threads_per_worker
    if options.workers == 0:
        return 1
    if local:
        return max(1, machine_cpus() // options.workers)
    return max(1, int(options.cpus_per_worker))


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
