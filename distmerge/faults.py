"""Fault injection for the fault-tolerance tests: crash or hang a worker in the middle of a shard.

Off unless `DISTMERGE_FAULT` is set, to `crash:<block id>` (the process exits at once, as when it is
OOM-killed) or `hang:<block id>` (the process stops making progress, as when its node goes away). The fault
fires once: `DISTMERGE_FAULT_MARKER` names a file that is created (holding the pid and Ray node id) when it
fires, and a fault whose marker exists does nothing, so the retried block succeeds.
"""

from __future__ import annotations

import os
import time

FAULT_ENV = ("DISTMERGE_FAULT", "DISTMERGE_FAULT_MARKER")


def fault_env() -> dict[str, str]:
    """The fault variables of this process, to forward to workers."""
    return {k: os.environ[k] for k in FAULT_ENV if k in os.environ}


def maybe_inject(block_id: int) -> None:
    spec = os.environ.get("DISTMERGE_FAULT")
    marker = os.environ.get("DISTMERGE_FAULT_MARKER")
    if not spec or not marker:
        return
    kind, _, target = spec.partition(":")
    if int(target) != block_id:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # already fired once
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{os.getpid()} {_node_id()}\n")
    if kind == "crash":
        os._exit(17)
    if kind == "hang":
        while True:
            time.sleep(3600)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
    except Exception:  # outside Ray
        return "-"
