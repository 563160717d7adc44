"""What a merge keeps under its staging prefix, so a killed merge can resume without redoing finished work.

Layout of `<parent>/.<output>.distmerge-staging/`:
- `plan.json`: the plan and its hash. A resume with a different plan (other recipe, changed inputs) refuses.
- `stats.json`: reduced statistics, once every phase has run.
- `records/<shard>.json`: written by the worker right after its shard, with size and sha256. On resume a
  block counts as done only if its shard verifies against the record.
- the shards themselves, moved into the output by the commit.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from distmerge.errors import MergeError
from distmerge.plan import Plan
from distmerge.storage import Location
from distmerge.writer import ShardRecord, verify_shard

log = logging.getLogger(__name__)


class StagingState:
    def __init__(self, staging: Location, plan: Plan):
        self.staging = staging
        self.plan = plan
        self.plan_hash = plan.hash()

    def prepare(self, resume: bool) -> None:
        """Fresh start (drop any old staging) or resume (same plan hash required)."""
        plan_file = self.staging.child("plan.json")
        if resume and plan_file.exists():
            staged = json.loads(plan_file.read_text())
            if staged.get("plan_hash") != self.plan_hash:
                raise MergeError(
                    f"cannot resume: the staged merge at {self.staging.url} has plan {staged.get('plan_hash')}, "
                    f"this recipe gives {self.plan_hash} (recipe or inputs changed). Fix: run without --resume "
                    "to start over"
                )
            log.info("resuming staged merge %s", self.plan_hash)
            return
        if resume:
            log.info("nothing staged at %s; starting a fresh merge", self.staging.url)
        self.staging.remove(recursive=True)
        plan_file.write_bytes(json.dumps({"plan_hash": self.plan_hash, "plan": self.plan.to_json()}).encode())

    # -- statistics -----------------------------------------------------------------------------------
    def load_stats(self) -> dict[str, Any] | None:
        loc = self.staging.child("stats.json")
        return stats_from_json(json.loads(loc.read_text())) if loc.exists() else None

    def save_stats(self, stats: dict[str, Any]) -> None:
        self.staging.child("stats.json").write_bytes(json.dumps(stats_to_json(stats)).encode())

    # -- shards ---------------------------------------------------------------------------------------
    def completed(self, check_hash: bool = True) -> dict[int, ShardRecord]:
        """Blocks whose staged shard verifies against its record."""
        done = {}
        records_dir = self.staging.child("records")
        present = records_dir.list() if records_dir.exists() else {}
        for block in self.plan.blocks:
            name = f"{block.file}.json"
            if name not in present:
                continue
            record = ShardRecord.from_json(json.loads(records_dir.child(name).read_text()))
            if record.tensors == block.tensors and verify_shard(self.staging, record, check_hash=check_hash):
                done[block.id] = record
            else:
                log.warning("staged shard %s does not verify; it will be recomputed", block.file)
        return done


def save_record(staging: Location, record: ShardRecord) -> None:
    """Called on the worker right after its shard is written."""
    staging.child("records", f"{record.file}.json").write_bytes(json.dumps(record.to_json()).encode())


def stats_to_json(stats: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in stats.items():
        if isinstance(value, torch.Tensor):
            out[key] = {"__tensor__": value.cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
        else:
            out[key] = value
    return out


def stats_from_json(raw: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict) and "__tensor__" in value:
            out[key] = torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        else:
            out[key] = value
    return out


def json_safe(stats: dict[str, Any]) -> dict[str, Any]:
    """Stats for provenance: small tensors as lists, large ones summarised."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.tolist() if value.numel() <= 64 else f"tensor{list(value.shape)}"
        else:
            out[key] = value
    return out
