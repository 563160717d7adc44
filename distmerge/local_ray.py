"""Which Ray a merge uses: the one this process is connected to, the cluster named by --address (or
RAY_ADDRESS, set inside `ray job submit` jobs), or a lean local Ray started for the merge.

A local Ray takes seconds to start (GCS, raylet, object store, then actors importing torch), about as long
as a small merge computes, so it starts on its own thread (`LocalRay`) and the merge does not wait for it:
the CLI enters `started_early` before it imports torch, and the executor merges blocks in the driver until the
first actor is ready (see `distmerge.execute_ray`). This module does not import torch, so starting early
really happens before that import.

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
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import ray

from distmerge.options import RunOptions, machine_cpus
from distmerge.priority import lower_this_thread

log = logging.getLogger(__name__)

# A local Ray started by distmerge caps its object store: only manifests and the plan travel through it
# (Ray's minimum is 75 MiB).
LOCAL_OBJECT_STORE_BYTES = 80 * 1024**2

_early: dict[str, LocalRay] = {}  # "ray": the local Ray started_early began, not yet claimed by connect_ray


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


@contextlib.contextmanager
def started_early(options: RunOptions) -> Iterator[bool]:
    """Begin starting the local Ray `connect_ray(options)` would start, and return at once; a start no merge
    claimed (the recipe was bad, say) is stopped on leaving. Yields whether a local Ray is starting: not
    without workers, with a cluster address, or when this process already has Ray."""
    starting = _start_early(options)
    try:
        yield starting
    finally:
        unclaimed = _early.pop("ray", None)
        if unclaimed is not None:
            # Leaving Ray half-started at exit would orphan its agents: let it come up, then shut it down.
            unclaimed.stop()


def _start_early(options: RunOptions) -> bool:
    if options.workers == 0 or cluster_address(options) or ray.is_initialized() or "ray" in _early:
        return False
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # What ray.init sets on a main thread: SIGTERM exits through atexit, so Ray is shut down cleanly.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    # With the lane on, the merge runs here while Ray starts: Ray's start-up takes only the cycles it leaves.
    _early["ray"] = LocalRay(options, background=options.merge_while_starting)
    return True


class LocalRay:
    """A local Ray started on a thread of its own, which stays alive until `stop`: Ray's daemons get a
    parent-death signal when the thread that spawned them exits, so it cannot be a short-lived helper.
    `background`: that thread, and so every Ray process, runs at the lowest CPU priority (`distmerge.priority`)."""

    def __init__(self, options: RunOptions, background: bool = False):
        self.error: BaseException | None = None
        self.background = background
        self._up = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(options,), name="distmerge-ray", daemon=True)
        self._thread.start()

    def _run(self, options: RunOptions) -> None:
        try:
            if self.background:
                lower_this_thread()
            with _off_main_thread_quietly():
                init_local_ray(options)
        except BaseException as exc:  # re-raised on the thread that waits for Ray
            self.error = exc
        finally:
            self._up.set()
        self._release.wait()

    def wait(self, timeout: float | None = None) -> bool:
        """True once Ray is up (False if `timeout` passes first); raises what stopped it from starting."""
        if not self._up.wait(timeout):
            return False
        if self.error is not None:
            raise self.error
        return True

    def stop(self) -> None:
        """Shut Ray down (after it has finished starting: a half-started Ray cannot be shut down), then
        let the thread end."""
        try:
            self._up.wait()
            if self.error is None and ray.is_initialized():
                ray.shutdown()
        finally:
            self._release.set()
            self._thread.join()


class RaySession:
    """The Ray a pool of merge actors runs on: `owned` if connected or started for it (closed with it)."""

    def __init__(self, owned: bool, local: LocalRay | None = None):
        self.owned = owned
        self.local = local

    def wait(self, timeout: float | None = None) -> bool:
        return self.local is None or self.local.wait(timeout)

    def close(self) -> None:
        if self.local is not None:
            self.local.stop()
        elif self.owned:
            ray.shutdown()


def connect_ray(options: RunOptions) -> RaySession:
    """The Ray in use, the cluster at --address, or a local Ray: `started_early`'s, else one started now on
    its own thread (`wait` for it)."""
    early = _early.pop("ray", None)
    if early is not None:
        return RaySession(owned=True, local=early)
    if ray.is_initialized():
        return RaySession(owned=False)
    address = cluster_address(options)
    if address:
        ray.init(address=address, namespace="distmerge", log_to_driver=True)
        return RaySession(owned=True)
    return RaySession(owned=True, local=LocalRay(options))


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


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _off_main_thread_quietly() -> Iterator[None]:
    """`ray.init` off the main thread warns that it did not set its SIGTERM handler (exit through atexit). The
    CLI sets the same handler itself (`started_early`), a library caller keeps its own: the warning would
    only alarm users."""
    worker_log = logging.getLogger("ray._private.worker")
    quiet = _DropRecords("SIGTERM handler is not set")
    worker_log.addFilter(quiet)
    try:
        yield
    finally:
        worker_log.removeFilter(quiet)
