"""Run options: how to execute a recipe (workers, block size, device), as opposed to what to merge.

CLI flags of `distmerge merge` derive from these fields, so each setting is defined and documented once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from distmerge.plan import DEFAULT_BLOCK_SIZE


class RunOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: int = Field(0, ge=0, description="Ray worker actors; 0 merges in this process without Ray.")
    address: str | None = Field(None, description="Ray cluster address (e.g. auto, ray://host:10001); "
                                "default starts a local Ray.")
    block_size: int = Field(DEFAULT_BLOCK_SIZE, gt=0, description="Target output bytes per block (= per output shard).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Compute device; auto uses a GPU when present.")
    resume: bool = Field(False, description="Reuse staged shards of an interrupted merge whose checksums verify.")
    overwrite: bool = Field(False, description="Replace a committed checkpoint at the output URL.")
    verify: Literal["sha256", "size"] = Field("sha256", description="How staged shards are checked before commit.")
    progress: bool = Field(True, description="Show a progress bar on the driver.")
    in_flight_per_worker: int = Field(2, ge=1, description="Blocks queued per worker (bounds driver memory).")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs each worker reserves (fractions allowed).")
    gpus_per_worker: float = Field(1.0, ge=0, description="Ray GPUs each worker reserves when the device is cuda.")
    max_retries: int = Field(3, ge=0, description="Times a block is retried after its worker dies.")
    block_timeout: float | None = Field(
        None, gt=0, description="Seconds after which a block's worker is presumed hung, replaced, and the block "
        "retried (default: wait; a dead worker or node is detected by Ray either way)."
    )


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
