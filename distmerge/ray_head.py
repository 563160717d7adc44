"""The process that runs the local Ray of one merge: `python -m distmerge.ray_head INIT_KWARGS [--lean]
[--background]`, started by `local_ray.LocalRay`.

Ray starts here rather than in the driver's process, so that a merge done before Ray is up (the start-up
lane merged every block) stops it at once, this process and every one it started by PID, instead of waiting
seconds for Ray to finish starting: a Ray half-started in the driver's own process can only be shut down
once it is up, and leaving it at exit orphans its agents. It also keeps Ray's Python start-up off the
driver's interpreter, which is importing torch and merging meanwhile.

Protocol, on the pipes the driver holds: one JSON line on stdout once Ray is up, {"address": GCS address},
or {"error": why} if it failed to start; then this process keeps Ray up until its stdin closes (the driver
stopping it, or dying) and shuts it down. Ray's own output, and that of every process it starts, goes to
stderr. `--lean` starts the head without the autoscaler monitor and the dashboard's API server (see
`_lean_head`); `--background` runs this process, and so all of Ray's, at the lowest CPU priority.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator

from distmerge.priority import lower_this_thread

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    kwargs, flags = json.loads(argv[0]), set(argv[1:])
    # The protocol gets private copies of the pipes; fd 0 and 1, which every Ray process inherits, become
    # /dev/null and stderr, so no Ray process holds the driver's pipes or writes into the protocol.
    control, reply = os.fdopen(os.dup(0)), os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    if "--background" in flags:
        lower_this_thread()  # before Ray starts a thread or a process: they all inherit it

    import ray

    try:
        with _lean_head() if "--lean" in flags else contextlib.nullcontext():
            ray.init(**kwargs)
    except Exception as exc:  # told to the driver, which raises it where it waits for Ray
        reply.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        reply.flush()
        return 1
    reply.write(json.dumps({"address": ray.get_runtime_context().gcs_address}) + "\n")
    reply.flush()
    control.read()  # until the driver closes the pipe
    ray.shutdown()
    return 0


@contextlib.contextmanager
def _lean_head() -> Iterator[None]:
    """While `ray.init` starts a head node here, skip the autoscaler monitor and the dashboard API server.

    A private per-merge Ray has no use for either: nothing to scale, and no client of it calls the job and
    state REST APIs. Each is a Python process importing Ray; on 2 cores leaving them out takes a local
    `ray.init` from 2.2-3.4 s to 1.4-1.5 s, and `ray.shutdown` from 1.4 s to 0.1-0.4 s (Ray stops the monitor
    after the GCS, and its SIGTERM handler then waits on the dead GCS until Ray SIGKILLs it a second later).
    Ray has no public switch for either. Falls back to Ray's full head if its Node lacks those methods.
    """
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
