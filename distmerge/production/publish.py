"""Promotion: `<root>/latest.json` names the model that serving should load, and is replaced in one step.

    {"url": ".../runs/<run-id>/model", "run_id": ..., "recipe_hash": ..., "metrics": {...}, "published_at": ...}

A reader sees the old pointer or the new one, never a mix: locally the pointer is written to a temporary
name in the same folder and renamed over the old one (rename is atomic on POSIX); on object stores it is
one PUT, which becomes visible all at once. Only a run whose gates all passed calls `promote`; a failed
gate never reaches this module, so the previous pointer stays exactly as it was.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from distmerge.storage import Location, translate_errors

POINTER_NAME = "latest.json"


def write_atomic(target: Location, data: bytes) -> None:
    """Replace `target` with `data` so that readers never observe a partial file."""
    local = target.local_path
    if local is None:
        target.write_bytes(data)  # a single PUT: object stores publish it whole or not at all
        return
    folder = os.path.dirname(local) or "."
    temporary = os.path.join(folder, f".{os.path.basename(local)}.{uuid.uuid4().hex[:8]}.tmp")
    with translate_errors(target.url, "write"):
        os.makedirs(folder, exist_ok=True)
        with open(temporary, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, local)


def pointer_location(root: str, storage_options: dict[str, Any] | None = None) -> Location:
    return Location(root, storage_options).child(POINTER_NAME)


def read_pointer(root: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The current pointer under `root`, or None when nothing was published yet."""
    pointer = pointer_location(root, storage_options)
    return json.loads(pointer.read_text()) if pointer.exists() else None


def promote(root: str, *, url: str, run_id: str, recipe_hash: str, metrics: dict[str, Any],
            storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Point `<root>/latest.json` at the model at `url`; returns the pointer written."""
    pointer = {"url": url, "run_id": run_id, "recipe_hash": recipe_hash, "metrics": metrics,
               "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_atomic(pointer_location(root, storage_options), (json.dumps(pointer, indent=2) + "\n").encode())
    return pointer
