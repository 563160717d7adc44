"""Write a sharded safetensors checkpoint through a staging prefix and commit it atomically.

Shards are streamed to `<parent>/.<name>.distmerge-staging/` (a sibling of the output, so a local commit is
a rename on one filesystem). `commit` verifies every staged shard against its record (size, checksum), moves
shards, auxiliary files and the manifest into place, and writes `model.safetensors.index.json` LAST: a
reader that finds the index finds a complete checkpoint; a crash before that leaves no index, and the
staging prefix can be resumed. Inputs are never overwritten.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from distmerge.checkpoint import AUX_FILES, INDEX_NAME
from distmerge.checksum import algorithm_of, checksum_text, new_hasher
from distmerge.errors import CheckpointError, StorageError
from distmerge.safetensors_format import write_safetensors
from distmerge.storage import Location, location

log = logging.getLogger(__name__)

MANIFEST_NAME = "distmerge_manifest.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class ShardRecord:
    """What a worker reports after writing one shard: small enough to send back to a driver."""

    file: str
    size: int
    checksum: str  # "<algorithm>:<hex>" (distmerge.checksum)
    tensors: tuple[str, ...]
    num_bytes_data: int = 0
    # The store's tag of the staged object right after the worker wrote it (S3 ETag, GCS generation); None on
    # filesystems that keep none. Where set, verifying compares it instead of reading the shard back.
    version: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping) -> ShardRecord:
        # Records of older versions carry a bare "sha256".
        checksum = raw["checksum"] if "checksum" in raw else f"sha256:{raw['sha256']}"
        return cls(raw["file"], int(raw["size"]), checksum, tuple(raw["tensors"]), int(raw.get("num_bytes_data", 0)),
                   raw.get("version"))


def pack_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving packing of (name, nbytes) into shards of at most max_shard_bytes.

    A tensor larger than the limit gets a shard of its own (tensors are never split).
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if current and used + nbytes > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def staging_location(output: Location) -> Location:
    return output.parent.child(f".{output.name}.distmerge-staging")


def write_shard(staging: Location, file: str, tensors: Sequence[tuple[str, torch.Tensor]]) -> ShardRecord:
    """Stream one safetensors shard into the staging prefix and return its record."""
    target = staging.child(file)
    with target.open_write() as stream:
        size, digest = write_safetensors(stream, list(tensors))
    data_bytes = sum(t.numel() * t.element_size() for _, t in tensors)
    return ShardRecord(file, size, digest, tuple(n for n, _ in tensors), data_bytes, target.version())


def verify_shard(staging: Location, record: ShardRecord, *, check_hash: bool = True) -> bool:
    """True when the staged shard has the recorded size and content. The content check reads the shard back
    and compares its checksum, except on an object store that tagged the object when the worker wrote it:
    there the tag must be unchanged (one metadata request), so the commit does not download the merge
    through the driver. The checksum itself was computed from the bytes the worker streamed, and the store
    checks an upload's integrity as it receives it."""
    loc = staging.child(record.file)
    try:
        if loc.size() != record.size:
            return False
        if not check_hash:
            return True
        if record.version is not None:
            return loc.version() == record.version
        return _checksum(loc, algorithm_of(record.checksum)) == record.checksum
    except (StorageError, ValueError):
        return False


def _checksum(loc: Location, algorithm: str, chunk: int = 8 << 20) -> str:
    # 8 MiB per ranged read: big enough for object stores, small enough that verifying at commit (while the
    # merge's workers are still stopping) adds little to the run's peak memory.
    digest = new_hasher(algorithm)
    size = loc.size()
    for start in range(0, size, chunk):
        digest.update(loc.read_range(start, min(size, start + chunk), file_size=size))
    return checksum_text(digest, algorithm)


@dataclass
class CheckpointWriter:
    """Stages shards and extra files for `output`, then commits them with the index written last."""

    output: Location
    overwrite: bool = False
    protected: Sequence[str] = ()  # input URLs that must never be written to
    staging: Location = field(init=False)

    def __post_init__(self) -> None:
        self.output = location(self.output)
        self.staging = staging_location(self.output)
        for url in self.protected:
            if self.output.same_place(url):
                raise CheckpointError("output is one of the inputs; refusing to overwrite it", file=self.output.url,
                                      fix="choose another output URL")
        if not self.overwrite and self.output.child(INDEX_NAME).exists():
            raise CheckpointError("a committed checkpoint already exists here", file=self.output.url,
                                  fix="choose a new output URL or pass overwrite")

    def write_shard(self, file: str, tensors: Sequence[tuple[str, torch.Tensor]]) -> ShardRecord:
        return write_shard(self.staging, file, tensors)

    def stage_file(self, name: str, data: bytes) -> None:
        self.staging.child(name).write_bytes(data)

    def stage_aux_from(self, source: str | Location, config_updates: Mapping | None = None) -> list[str]:
        """Copy config, generation config and tokenizer files from `source`; returns the names copied."""
        src = location(source)
        present = src.list()
        copied = []
        for name in AUX_FILES:
            if name not in present:
                continue
            data = src.child(name).read_bytes()
            if name == "config.json" and config_updates:
                config = json.loads(data)
                config.update(config_updates)
                data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
            self.stage_file(name, data)
            copied.append(name)
        return copied

    def commit(self, records: Sequence[ShardRecord], extra_files: Sequence[str] = (), *,
               check_hash: bool = True, metadata: Mapping | None = None) -> None:
        """Verify staged shards, move everything into place, write the index last, drop the staging."""
        # Hashing releases the GIL: shards verify in parallel (the last step of every merge, on the driver).
        with ThreadPoolExecutor(max(1, min(4, len(records)))) as pool:
            ok = list(pool.map(lambda r: verify_shard(self.staging, r, check_hash=check_hash), records))
        bad = [r.file for r, good in zip(records, ok, strict=True) if not good]
        if bad:
            raise CheckpointError(f"staged shard(s) {bad} do not match their records (size/checksum); nothing "
                                  "was published", file=self.staging.url, fix="re-run the merge (or --resume)")
        names = [n for r in records for n in r.tensors]
        if len(names) != len(set(names)):
            raise CheckpointError("a tensor is recorded in two shards", file=self.staging.url,
                                  fix="this is a planning bug; report it")
        index = {
            "metadata": {"total_size": sum(r.num_bytes_data for r in records), **(metadata or {})},
            "weight_map": {n: r.file for r in sorted(records, key=lambda r: r.file) for n in r.tensors},
        }
        # The staged objects' store tags are for this check only: the published objects are copies.
        manifest = {"shards": [{k: v for k, v in r.to_json().items() if k != "version"}
                               for r in sorted(records, key=lambda r: r.file)]}
        self.stage_file(MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
        self._retire_previous()
        for name in [*sorted(r.file for r in records), *extra_files, MANIFEST_NAME]:
            self.staging.child(name).move_to(self.output.child(name))
        self.output.child(INDEX_NAME).write_bytes((json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        self.staging.remove(recursive=True)
        log.info("committed %d shard(s) to %s", len(records), self.output.url)

    def _retire_previous(self) -> None:
        # An overwrite first removes the old index, so no reader can see a mix of old and new shards.
        if self.output.exists() and self.output.child(INDEX_NAME).exists():
            self.output.child(INDEX_NAME).remove()
            for name in self.output.list():
                if name.endswith(".safetensors") or name == MANIFEST_NAME:
                    self.output.child(name).remove()
