"""Which Ray a merge uses: the one this process is connected to, the cluster named by --address (or
RAY_ADDRESS, set inside `ray job submit` jobs), or a lean local Ray started for the merge.

A local Ray takes seconds to start (GCS, raylet, object store), about as long as a small merge computes, so
the CLI calls `start_early` before it imports torch: Ray comes up while a thread imports torch and the
merge code, and `ensure_ray` (the executor's) then finds it started. This module does
not import torch, so starting early really happens before that import.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import threading
from typing import Any

import ray

from distmerge.options import RunOptions, machine_cpus

log = logging.getLogger(__name__)

# A local Ray started by distmerge caps its object store: only manifests and the plan travel through it
# (Ray's minimum is 75 MiB).
LOCAL_OBJECT_STORE_BYTES = 80 * 1024**2

_early: dict[str, Any] = {}  # "started": start_early started the local Ray, not yet claimed by ensure_ray


def cluster_address(options: RunOptions) -> str | None:
    return options.address or os.environ.get("RAY_ADDRESS")


def local_ray_init_kwargs(options: RunOptions) -> dict[str, Any]:
    """`ray.init` arguments for the local Ray a merge starts (the benchmark's Ray baseline uses them too)."""
    cpus = max(machine_cpus(), math.ceil(options.workers * options.cpus_per_worker))
    dashboard = {"dashboard_host": "127.0.0.1"} if options.dashboard else {}
    return dict(
        num_cpus=cpus, include_dashboard=options.dashboard, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        namespace="distmerge", log_to_driver=True,
        # Ray starts one idle Python worker per CPU when the driver connects; the actors start their own.
        _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False}, **dashboard,
    )


def start_early(options: RunOptions, preload: str) -> None:
    """Start the local Ray `ensure_ray(options)` would start, importing the module `preload` (torch and the
    merge code) on a thread meanwhile. No-op without workers, with a cluster address, or when this process
    already has Ray.

    Ray starts on this thread, not on a helper: its daemons die with the thread that spawned them (Linux
    parent-death signal), so a helper thread that finished would take the local Ray down with it.
    """
    if options.workers == 0 or cluster_address(options) or ray.is_initialized():
        return
    loader = threading.Thread(target=_import_quietly, args=(preload,), name="distmerge-preload", daemon=True)
    loader.start()
    ray.init(**local_ray_init_kwargs(options))
    _early["started"] = True
    loader.join()


def _import_quietly(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception:  # the caller's own import raises it again, on its thread
        log.debug("preloading %s failed", module, exc_info=True)


def ensure_ray(options: RunOptions) -> bool:
    """Connect to the Ray in use, the cluster at --address, or start a local one (or finish `start_early`'s).
    True if Ray was started for this merge (the caller shuts it down)."""
    if _early.pop("started", False) and ray.is_initialized():
        return True
    if ray.is_initialized():
        return False
    address = cluster_address(options)
    if address:
        ray.init(address=address, namespace="distmerge", log_to_driver=True)
        return True
    ray.init(**local_ray_init_kwargs(options))
    return True
