"""Which Ray a merge uses: the one this process is connected to, the cluster named by --address (or
RAY_ADDRESS, set inside `ray job submit` jobs), or a lean local Ray started for the merge.

A local Ray takes seconds to start (GCS, raylet, agents, then actors importing torch), about as long as a
small merge computes, so the merge does not wait for it: the executor merges blocks in the driver (see
`distmerge.execute_ray`, `distmerge.startup_lane`) and the head runs in a process of its own
(`distmerge.ray_head`). With that start-up lane on a CPU merge, the head is started only once the lane
estimates that the blocks left would outlast Ray's and an actor's start-up: a merge the driver finishes
sooner never starts Ray, whose start-up would only take cycles from it. Otherwise (a GPU merge, the lane
off, `--dashboard`) the CLI starts the head before it imports torch (`started_early`). This process connects
to the head on a thread once the head is up and actors are wanted. When the merge ends first, `LocalRay.stop`
stops the head and every process it started at once, by PID, rather than wait for a Ray nobody needs any
more to finish starting. This module does not import torch, so starting early really happens before that
import.

Without `--dashboard` the local Ray is also started without two head daemons a private per-merge Ray has no
use for: the autoscaler monitor and the dashboard's API server (`ray_head._lean_head`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

from distmerge.lazy_ray import ray, ray_initialized
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
            unclaimed.stop()


def lane_expected(options: RunOptions) -> bool:
    """Whether a merge with these options will likely run the start-up lane: a CPU merge (asked for, or `auto`
    on a machine without an NVIDIA device) on a local Ray, without the dashboard a user asked to watch. Its
    local Ray then starts only when the lane asks for it."""
    cpu = options.device == "cpu" or (options.device == "auto" and not glob.glob("/dev/nvidia[0-9]*"))
    return options.merge_while_starting and not options.dashboard and cpu


def _start_early(options: RunOptions) -> bool:
    if options.workers == 0 or cluster_address(options) or ray_initialized() or "ray" in _early:
        return False
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # What ray.init sets on a main thread: SIGTERM exits through atexit and finally blocks, so the local
        # Ray is stopped too.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    # With the lane on, the merge runs here while Ray starts: Ray's start-up takes only the cycles it leaves.
    _early["ray"] = LocalRay(options, background=options.merge_while_starting, start=not lane_expected(options))
    return True


class LocalRay:
    """A local Ray for one merge: its head runs in a process of its own (`distmerge.ray_head`), started here
    now, or with `start=False` by the first `start` or `wait`. A thread waits for the head to be up and, once
    `wait` is first called, connects this process to it: a merge that needs no actor (the start-up lane
    merged it all) never connects.

    `background`: the head and every Ray process, and this process's connection, run at the lowest CPU
    priority (`distmerge.priority`).
    """

    def __init__(self, options: RunOptions, background: bool = False, start: bool = True):
        self.error: BaseException | None = None
        self.background = background
        self._up = threading.Event()
        self._wanted = threading.Event()  # the first `wait` asks for the connection
        self._lock = threading.Lock()
        self._stopping = False
        self._connecting = False
        flags = [*([] if options.dashboard else ["--lean"]), *(["--background"] if background else [])]
        self._command = [sys.executable, "-m", "distmerge.ray_head", json.dumps(local_ray_init_kwargs(options)),
                         *flags]
        self._head: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    @property
    def started(self) -> bool:
        """Whether the head process has been started (Ray may still be coming up)."""
        return self._head is not None

    def start(self) -> None:
        """Start the head process, unless started or stopped already; returns at once."""
        with self._lock:
            if self._head is not None or self._stopping:
                return
            # Its own session: Ctrl-C in a terminal reaches this process, which stops the head, not a head
            # interrupted half-way through starting Ray.
            self._head = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                          start_new_session=True)
            self._thread = threading.Thread(target=self._connect, name="distmerge-ray", daemon=True)
            self._thread.start()

    def _connect(self) -> None:
        try:
            line = self._head.stdout.readline()  # the head is reaped only by `stop`: its pid stays its own
            reply = json.loads(line) if line.strip() else {"error": "its head process exited (its log is above)"}
            if "error" in reply:
                raise RuntimeError(f"the local Ray did not start: {reply['error']}")
            self._wanted.wait()
            with self._lock:
                if self._stopping:
                    return
                self._connecting = True
            if self.background:
                lower_this_thread()
            with _off_main_thread_quietly():
                ray.init(address=reply["address"], namespace="distmerge", log_to_driver=True)
        except BaseException as exc:  # re-raised on the thread that waits for Ray
            self.error = exc
        finally:
            self._up.set()

    def wait(self, timeout: float | None = None) -> bool:
        """True once Ray is up and this process connected (False if `timeout` passes first); raises what
        stopped it from starting. Starts the head if it was not."""
        self.start()
        if self._head is None:
            raise RuntimeError("the local Ray was stopped before it started")
        self._wanted.set()
        if not self._up.wait(timeout):
            return False
        if self.error is not None:
            raise self.error
        return True

    def stop(self) -> None:
        """Disconnect, then stop the head and every process it started, by PID: whether Ray is up or still
        starting, at once (a graceful `ray.shutdown` of the head takes 0.3-1 s more, for a Ray that holds
        nothing the merge still needs)."""
        with self._lock:
            self._stopping = True
            connecting = self._connecting
        if self._head is None:
            return  # never started (and now never will be)
        self._wanted.set()  # a thread waiting to connect ends instead
        if connecting:
            self._up.wait()  # a connection under way completes first
            if ray.is_initialized():
                ray.shutdown()
        try:
            stop_process_tree(self._head.pid)  # nothing of this private Ray outlives the merge
            with contextlib.suppress(ProcessLookupError, PermissionError):
                # Left in the head's process group once it is gone: what a head that died had started.
                os.killpg(self._head.pid, signal.SIGKILL)
        finally:
            self._head.wait()
            self._thread.join()
            self._head.stdout.close()
            if not self._head.stdin.closed:
                self._head.stdin.close()


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
    """The Ray in use, the cluster at --address, or a local Ray: `started_early`'s, else one started now, or
    when first waited for if the start-up lane is expected (`lane_expected`)."""
    early = _early.pop("ray", None)
    if early is not None:
        return RaySession(owned=True, local=early)
    if ray_initialized():
        return RaySession(owned=False)
    address = cluster_address(options)
    if address:
        ray.init(address=address, namespace="distmerge", log_to_driver=True)
        return RaySession(owned=True)
    return RaySession(owned=True, local=LocalRay(options, start=not lane_expected(options)))


def stop_process_tree(pid: int) -> None:
    """Kill process `pid` and every process below it: all are frozen first (SIGSTOP), looking again until no
    new one appears, so that none spawns a child that would escape as an orphan; then all are killed."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    frozen: dict[int, psutil.Process] = {}
    while True:
        try:
            found = [p for p in [root, *root.children(recursive=True)] if p.pid not in frozen]
        except psutil.NoSuchProcess:
            found = []
        if not found:
            break
        for process in found:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.suspend()
            frozen[process.pid] = process
    for process in frozen.values():  # a stopped process dies of SIGKILL at once
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


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
