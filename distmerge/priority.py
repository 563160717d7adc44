"""CPU priority of a local Ray started for one merge: its start-up runs in the background.

The CLI merges in its own process while that Ray starts (the start-up lane, `distmerge.startup_lane`), and on
a machine whose cores the lane fills, Ray's start-up (GCS, raylet, agents, then each actor importing torch:
about 4 s of CPU) only competes with the merge: on 2 cores a 0.5B TIES merge took 1-2 s longer. So the Ray head
process (`distmerge.ray_head`) lowers its priority to nice 19 first, which every process it spawns inherits
(Linux sets nice per thread; a new thread or process takes its spawning thread's), as does the driver's thread
that connects to it; the merge gets the cores while Ray takes what they leave idle. The lane merges as fast as the
actors would (same machine, same code), so the merge loses nothing while they start later. An actor puts its
process back at the driver's priority with its first block when the system lets it (raising priority needs
CAP_SYS_NICE, e.g. root in a container); otherwise the actors stay at nice 19, which only matters against other
work on the same machine. Linux only; elsewhere nothing changes."""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

BACKGROUND_NICE = 19  # the lowest priority


def _supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "setpriority")


def lower_this_thread() -> bool:
    """Put the calling thread (and what it spawns from now on) at the lowest CPU priority."""
    if not _supported():
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        return True
    except OSError as exc:
        log.debug("could not lower the Ray start-up thread's priority: %s", exc)
        return False


def this_thread_priority() -> int | None:
    """The calling thread's nice value (None where per-thread priorities are not supported)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if _supported() else None


def set_process_priority(nice: int) -> bool:
    """Set every thread of this process to `nice`; False (and nothing raised) if the system does not allow
    it, as for an unprivileged process raising its priority."""
    if not _supported():
        return False
    try:
        for tid in map(int, os.listdir("/proc/self/task")):
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) != nice:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
            except ProcessLookupError:
                continue  # the thread exited meanwhile
        return True
    except OSError as exc:  # no permission to raise a priority
        log.debug("actor stays at its inherited priority (%s)", exc)
        return False
