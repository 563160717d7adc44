"""Which Ray a merge uses: the one this process is connected to, the cluster named by --address (or
RAY_ADDRESS, set inside `ray job submit` jobs), or a lean local Ray started for the merge.

A local Ray takes seconds to start (GCS, raylet, object store), about as long as a small merge computes, so
the CLI calls `start_early` before it imports torch: Ray comes up while a thread imports torch and the
merge code, and `ensure_ray` (the executor's) then finds it started. This module does
not import torch, so starting early really happens before that import.

Without `--dashboard` the local Ray is also started without two head daemons a private per-merge Ray has no
use for: the autoscaler monitor (nothing to scale) and the dashboard's API server (job and state REST APIs
that no client of this private Ray calls). Each is a Python process importing Ray; on 2 cores leaving them
out takes a local `ray.init` from 2.2-3.4 s to 1.4-1.5 s, and `ray.shutdown` from 1.4 s to 0.1-0.4 s (Ray
stops the monitor after the GCS, and its SIGTERM handler then waits on the dead GCS until Ray SIGKILLs it a
second later). Ray has no public switch for either, so `_lean_head` skips their start methods while
`ray.init` runs; everything else about the local Ray is `ray.init`'s own.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import threading
from collections.abc import Iterator
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
    """`ray.init` arguments for the local Ray a merge starts."""
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
    init_local_ray(options)
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
    init_local_ray(options)
    return True


def init_local_ray(options: RunOptions) -> None:
    """`ray.init` of the local Ray a merge starts: lean (see the module docstring) unless --dashboard."""
    kwargs = local_ray_init_kwargs(options)
    if options.dashboard:
        ray.init(**kwargs)
        return
    with _lean_head():
        ray.init(**kwargs)


@contextlib.contextmanager
def _lean_head() -> Iterator[None]:
    """While `ray.init` starts a head node here, skip the autoscaler monitor and the dashboard API server.
    Falls back to Ray's full head if this Ray's Node no longer has those start methods."""
    from ray._private.node import Node

    skipped = ("start_monitor", "start_api_server")
    saved = {name: Node.__dict__.get(name) for name in skipped}
    if not all(saved.values()):
        log.debug("this Ray's Node lacks %s; starting the full local head", skipped)
        yield
        return
    for name in skipped:
        setattr(Node, name, _skip_head_service)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(Node, name, method)


def _skip_head_service(self, *args, **kwargs) -> None:
    return None
