"""`ray` for the driver's modules, imported on first use.

A CLI merge imports these modules whether or not it will talk to Ray: a merge the driver finishes alone (the
start-up lane, `distmerge.startup_lane`) never does, since the local Ray's head runs in a process of its own
(`distmerge.ray_head`), and `import ray` costs ~0.5 s of the CLI's start, before torch is imported. A proxy
rather than `importlib.util.LazyLoader`: a lazy module in `sys.modules` is loaded by the first code that walks
them (torch's import does, through `inspect.getmodule`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


class _Ray:
    """Every attribute is the `ray` module's, imported on the first access."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("ray"), name)


ray: Any = _Ray()


def ray_initialized() -> bool:
    """`ray.is_initialized()`, without importing Ray when nothing has imported it yet (then it is not)."""
    module = sys.modules.get("ray")
    return module is not None and module.is_initialized()
