"""The storage edge: every byte distmerge reads or writes goes through `Location`.

Any fsspec URL works (local paths, `file://`, `memory://`, `s3://`, `gs://`, ...). Decisions:
- Ranges are validated here (0 <= start <= end <= size) because backends disagree on invalid ranges
  (S3 answers start > end with the whole object).
- Ranged reads use `cat_file`/`cat_ranges`, never a buffered `open()`: s3fs's default read-ahead would fetch
  tens of MiB for an 8-byte header read. Nearby ranges are coalesced into one request.
- Local files bypass fsspec for reads (`os.pread`) and offer an mmap for zero-copy tensor views.
- Credentials come from storage options or the environment (AWS_*, profiles); they are never logged: a
  Location prints as its URL only.
- A Location pickles as (url, options) and rebuilds its filesystem lazily, so Ray workers can receive one.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import fsspec

from distmerge.errors import StorageError

# Ranges closer than this are fetched in one request and split locally: fewer round trips to object stores
# at the price of reading a little padding.
DEFAULT_COALESCE_GAP = 1 << 20


def _is_local_protocol(protocol: str | tuple) -> bool:
    protos = (protocol,) if isinstance(protocol, str) else protocol
    return any(p in ("file", "local") for p in protos)


class Location:
    """A file or prefix at an fsspec URL, with the storage options needed to reach it."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None):
        self.url = str(url).rstrip("/") if str(url) not in ("/",) else str(url)
        self.options = dict(options or {})
        self._fs = None
        self._path: str | None = None

    # -- identity -------------------------------------------------------------------------------------
    def __repr__(self) -> str:  # never shows options: they may hold credentials
        return f"Location({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.url, self.options) == (other.url, other.options)

    def __hash__(self) -> int:
        return hash(self.url)

    def __getstate__(self) -> dict:
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["options"])

    @property
    def identity(self) -> tuple[str, str]:
        """(protocol, normalised path): equal for every spelling of one place (file://, relative, `./`, links)."""
        local = self.local_path
        if local is not None:
            return ("file", os.path.realpath(local))
        return (self.protocol, self.path.rstrip("/"))

    def same_place(self, other: Location | str) -> bool:
        return self.identity == location(other, self.options).identity

    def child(self, *parts: str) -> Location:
        return Location("/".join([self.url, *[p.strip("/") for p in parts]]), self.options)

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.url.rsplit("/", 1)[0], self.options)

    # -- filesystem -----------------------------------------------------------------------------------
    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            with translate_errors(self.url, "open the filesystem for"):
                self._fs, self._path = fsspec.core.url_to_fs(self.url, **self.options)
        return self._fs

    @property
    def path(self) -> str:
        self.fs  # noqa: B018 - resolves _path
        assert self._path is not None
        return self._path

    @property
    def local_path(self) -> str | None:
        """The OS path when this Location is on the local filesystem, else None."""
        return self.path if _is_local_protocol(self.fs.protocol) else None

    @property
    def protocol(self) -> str:
        proto = self.fs.protocol
        return proto if isinstance(proto, str) else proto[0]

    # -- queries --------------------------------------------------------------------------------------
    def exists(self) -> bool:
        with translate_errors(self.url, "check"):
            return bool(self.fs.exists(self.path))

    def size(self) -> int:
        with translate_errors(self.url, "stat"):
            return int(self.fs.size(self.path))

    def version(self) -> str | None:
        """The store's tag of the object as it is now (S3 ETag, GCS generation), fetched afresh with one
        metadata request; None where the filesystem keeps none (local files, memory://)."""
        if self.local_path is not None:
            return None
        with translate_errors(self.url, "stat"):
            self.fs.invalidate_cache(self.path)
            return object_version(self.fs.info(self.path))

    def list(self) -> dict[str, dict[str, Any]]:
        """Direct children of this prefix: {name: {"size": int, "type": "file"|"directory", ...}}.

        One LIST request on object stores; the details (ETag, mtime) feed fingerprints.
        """
        with translate_errors(self.url, "list"):
            self.fs.invalidate_cache(self.path)
            entries = self.fs.ls(self.path, detail=True)
        out = {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if name:
                out[name] = entry
        return out

    # -- reads ----------------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with translate_errors(self.url, "read"):
            return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_range(self, start: int, end: int, *, file_size: int | None = None) -> bytes:
        """Bytes [start, end) of this file; `file_size`, when known, saves a stat request."""
        return self.read_ranges([(start, end)], file_size=file_size)[0]

    def read_ranges(
        self, ranges: Sequence[tuple[int, int]], *, file_size: int | None = None,
        max_gap: int = DEFAULT_COALESCE_GAP,
    ) -> list[bytes]:
        """Bytes of each [start, end) range, in order. Nearby ranges are fetched together."""
        if not ranges:
            return []
        size = self.size() if file_size is None else file_size
        for start, end in ranges:
            validate_range(self.url, start, end, size)
        groups = coalesce_ranges(ranges, max_gap)
        with translate_errors(self.url, "read"):
            blobs = self._fetch([(g_start, g_end) for g_start, g_end, _ in groups])
        out: list[bytes] = [b""] * len(ranges)
        for (g_start, g_end, members), blob in zip(groups, blobs, strict=True):
            if len(blob) != g_end - g_start:
                raise StorageError(
                    f"short read from {self.url}: asked bytes [{g_start}, {g_end}), got {len(blob)}; "
                    "the object changed while reading or is truncated. Fix: re-run once the upload completes"
                )
            view = memoryview(blob)
            for i in members:
                start, end = ranges[i]
                out[i] = bytes(view[start - g_start:end - g_start]) if len(members) > 1 else blob
        return out

    def _fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        local = self.local_path
        if local is not None:
            fd = os.open(local, os.O_RDONLY)
            try:
                return [os.pread(fd, end - start, start) for start, end in ranges]
            finally:
                os.close(fd)
        if len(ranges) == 1:
            start, end = ranges[0]
            if start == end:
                return [b""]
            return [self.fs.cat_file(self.path, start=start, end=end)]
        return self.fs.cat_ranges(
            [self.path] * len(ranges), [r[0] for r in ranges], [r[1] for r in ranges], on_error="raise"
        )

    @contextlib.contextmanager
    def mmap(self) -> Iterator[mmap.mmap]:
        """Read-only memory map of a local file (zero-copy tensor views)."""
        local = self.local_path
        if local is None:
            raise StorageError(f"{self.url} is not a local file; mmap needs one")
        with translate_errors(self.url, "map"), open(local, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            yield mm
        finally:
            mm.close()

    # -- writes ---------------------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        with translate_errors(self.url, "write"):
            self._ensure_parent()
            self.fs.pipe_file(self.path, data)

    def open_write(self):
        """A binary file object for streaming writes (multipart upload on object stores)."""
        with translate_errors(self.url, "write"):
            self._ensure_parent()
            return self.fs.open(self.path, "wb")

    def _ensure_parent(self) -> None:
        if self.local_path is not None:
            os.makedirs(os.path.dirname(self.local_path) or ".", exist_ok=True)

    def move_to(self, dest: Location) -> None:
        """Move a file within one filesystem: an atomic rename locally, copy-then-delete elsewhere."""
        with translate_errors(self.url, f"move to {dest.url}"):
            if self.local_path is not None and dest.local_path is not None:
                os.makedirs(os.path.dirname(dest.local_path) or ".", exist_ok=True)
                os.replace(self.local_path, dest.local_path)
            else:
                self.fs.copy(self.path, dest.path)
                self.fs.rm_file(self.path)

    def remove(self, recursive: bool = False) -> None:
        with translate_errors(self.url, "remove"):
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=recursive)


def object_version(info: Mapping[str, Any]) -> str | None:
    """An object store's version tag in a listing or info entry (ETag, or GCS's generation), unquoted."""
    tag = info.get("ETag") or info.get("etag") or info.get("generation")
    return str(tag).strip('"') if tag else None


def location(url: str | Location, options: Mapping[str, Any] | None = None) -> Location:
    """Coerce a URL or Location (options given here override none that the Location carries)."""
    if isinstance(url, Location):
        return url
    return Location(url, options)


def validate_range(url: str, start: int, end: int, size: int) -> None:
    if start < 0 or end < 0:
        raise StorageError(f"invalid byte range [{start}, {end}) for {url}: negative offset")
    if start > end:
        raise StorageError(f"invalid byte range [{start}, {end}) for {url}: start is after end")
    if end > size:
        raise StorageError(
            f"byte range [{start}, {end}) is past the end of {url} ({size} bytes): the file is truncated "
            "or the header lies. Fix: re-upload or re-save the file"
        )


def coalesce_ranges(
    ranges: Sequence[tuple[int, int]], max_gap: int = DEFAULT_COALESCE_GAP
) -> list[tuple[int, int, list[int]]]:
    """Group ranges whose gaps are <= max_gap: [(start, end, [indices into ranges])], sorted by start."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    groups: list[tuple[int, int, list[int]]] = []
    for i in order:
        start, end = ranges[i]
        if groups and start - groups[-1][1] <= max_gap:
            g_start, g_end, members = groups[-1]
            groups[-1] = (g_start, max(g_end, end), [*members, i])
        else:
            groups.append((start, end, [i]))
    return groups


@contextlib.contextmanager
def translate_errors(url: str, action: str) -> Iterator[None]:
    """Turn backend exceptions into StorageError messages that name the URL and the fix."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageError(f"cannot {action} {url}: not found. Fix: check the URL and that the object exists") from exc
    except PermissionError as exc:
        raise StorageError(
            f"cannot {action} {url}: permission denied. Fix: check credentials (AWS_* environment, profile) "
            "and the bucket or directory permissions"
        ) from exc
    except (ConnectionError, TimeoutError) as exc:
        raise StorageError(f"cannot {action} {url}: unreachable ({exc}). Fix: check the endpoint and network") from exc
    except Exception as exc:  # backend-specific (botocore, aiohttp, gcsfs) errors have no common base
        text = f"{type(exc).__name__}: {exc}"
        if any(s in text for s in ("AccessDenied", "Forbidden", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
            raise StorageError(
                f"cannot {action} {url}: access denied ({text}). Fix: check credentials and bucket policy"
            ) from exc
        if any(s in text for s in ("NoSuchBucket", "NoSuchKey", "404")):
            raise StorageError(f"cannot {action} {url}: not found ({text}). Fix: check the bucket and key") from exc
        if any(s in text for s in ("Connect", "EndpointConnectionError", "Timeout", "Name or service")):
            raise StorageError(
                f"cannot {action} {url}: unreachable ({text}). Fix: check the endpoint URL and network"
            ) from exc
        if isinstance(exc, (ValueError, ImportError)):
            raise StorageError(f"cannot {action} {url}: {text}") from exc
        raise


def copy_tree(src: Location, dest: Location) -> list[str]:
    """Copy every file under `src` (one level, as checkpoints are flat) to `dest`; returns the names."""
    names = []
    for name, info in sorted(src.list().items()):
        if info.get("type") == "directory":
            continue
        dest.child(name).write_bytes(src.child(name).read_bytes())
        names.append(name)
    return names
