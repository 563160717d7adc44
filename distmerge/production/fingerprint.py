"""Fingerprints of input checkpoints, from listings and headers only (no tensor data is read).

Per checkpoint: each file's size and version tag from the store's listing (the ETag on object stores; the
modification time where a filesystem has no ETag) plus the sha256 of the safetensors headers (every
tensor's name, dtype, shape and byte range, and the header metadata) taken from `CheckpointIndex`. A new
upload changes the ETag even when sizes and headers stay the same; the header hash names what changed
in the weights' layout. The digest of a set of checkpoints (base, target, each model by name) decides
whether the scheduler has merged exactly these inputs before.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distmerge.checkpoint import CheckpointIndex
from distmerge.storage import object_version


def _version_tag(info: Mapping[str, Any]) -> str:
    tag = object_version(info) or info.get("mtime")
    if hasattr(tag, "isoformat"):
        tag = tag.isoformat()
    return str(tag or "")


def headers_sha256(index: CheckpointIndex) -> str:
    digest = hashlib.sha256()
    for name in sorted(index.files):
        header = index.files[name]
        digest.update(json.dumps([name, header.size, header.data_start, sorted(header.metadata.items())]).encode())
        for tensor in sorted(header.tensors.values(), key=lambda t: t.name):
            digest.update(json.dumps([tensor.name, tensor.dtype, list(tensor.shape), tensor.start, tensor.end]).encode())
    return digest.hexdigest()


def checkpoint_fingerprint(index: CheckpointIndex) -> dict[str, Any]:
    """{"url", "files": {name: {"size", "etag"}}, "headers_sha256", "digest"} of one indexed checkpoint."""
    files = {name: {"size": int(info.get("size") or 0), "etag": _version_tag(info)}
             for name, info in sorted(index.listing.items()) if info.get("type") != "directory"}
    headers = headers_sha256(index)
    digest = hashlib.sha256(json.dumps([files, headers], sort_keys=True).encode()).hexdigest()
    return {"url": index.url, "files": files, "headers_sha256": headers, "digest": digest}


@dataclass(frozen=True)
class FingerprintSet:
    """Fingerprints by role (base, target, model:<name>) and the digest of all of them."""

    items: dict[str, dict[str, Any]]
    digest: str

    def to_json(self) -> str:
        return json.dumps({role: {"url": fp["url"], "digest": fp["digest"]} for role, fp in self.items.items()},
                          sort_keys=True)


def fingerprint_set(items: Mapping[str, Mapping[str, Any]]) -> FingerprintSet:
    """The set's digest covers roles and checkpoint digests: renaming a model or replacing its files changes it."""
    pairs = sorted((role, fp["digest"]) for role, fp in items.items())
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    return FingerprintSet({role: dict(fp) for role, fp in items.items()}, digest)
