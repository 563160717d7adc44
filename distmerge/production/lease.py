"""A lease in object storage, so that two schedulers never run the same pipeline at once.

Design: the lease is a sequence of small JSON objects `<url>/<generation>.json` (owner, token, expiry); the
highest generation is the current one. To acquire, a scheduler reads the current generation g and, when it
is free (released, expired, or absent), creates generation g+1 *exclusively*. Exactly one contender can
create a given name, so exactly one wins; a contender that read a stale listing tries a name that already
exists and loses too. The one primitive needed is an exclusive create:
- S3 (s3fs): a conditional PUT with `If-None-Match: *` (`pipe_file(mode="create")`); S3 and moto answer
  412 when the key exists.
- Local and shared POSIX filesystems: the content is written to a private temporary file which is then
  hard-linked to the lease name; `link` fails when the name exists (the O_EXCL rule), and readers never
  see a half-written lease.
- Other fsspec backends: their `pipe_file(mode="create")`, atomic only where the backend makes it so.
The holder renews (rewrites its own generation with a later expiry) while it works; a renewal that finds a
newer generation reports the lease lost. Expiry compares wall clocks of different hosts: keep
`expiry_seconds` far above any clock skew. Old generations are kept (one small object per run): deleting
them could let a slow contender re-create a number that was already used.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from distmerge.production.publish import write_atomic
from distmerge.storage import Location, translate_errors

log = logging.getLogger(__name__)

_DIGITS = 12


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    token: str
    generation: int
    acquired_at: float
    expires_at: float
    released: bool = False

    def free(self, now: float) -> bool:
        return self.released or now >= self.expires_at

    def describe(self) -> str:
        until = time.strftime("%H:%M:%SZ", time.gmtime(self.expires_at))
        return f"{self.owner} (generation {self.generation}, until {until})"


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def create_exclusive(target: Location, data: bytes) -> bool:
    """Write `data` at `target` only if nothing is there; False when the name already exists."""
    local = target.local_path
    with translate_errors(target.url, "create"):
        if local is not None:
            os.makedirs(os.path.dirname(local), exist_ok=True)
            temporary = f"{local}.{uuid.uuid4().hex}.tmp"
            with open(temporary, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(temporary, local)
            except FileExistsError:
                return False
            finally:
                os.unlink(temporary)
            return True
        try:
            target.fs.pipe_file(target.path, data, mode="create")
        except FileExistsError:
            return False
        return True


class Lease:
    """One holder at a time for the lease at `url`; `acquire()` never blocks."""

    def __init__(self, url: str, expiry_seconds: float, storage_options: dict[str, Any] | None = None,
                 owner: str | None = None):
        self.root = Location(url, storage_options)
        self.expiry_seconds = expiry_seconds
        self.owner = owner or default_owner()
        self.token = uuid.uuid4().hex
        self.held: LeaseRecord | None = None

    # -- reading --------------------------------------------------------------------------------------
    def generations(self) -> list[int]:
        if not self.root.exists():
            return []
        names = self.root.list()
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def current(self) -> LeaseRecord | None:
        generations = self.generations()
        return self._read(generations[-1]) if generations else None

    def _child(self, generation: int) -> Location:
        return self.root.child(f"{generation:0{_DIGITS}d}.json")

    def _read(self, generation: int) -> LeaseRecord:
        return LeaseRecord(**json.loads(self._child(generation).read_text()))

    # -- holding --------------------------------------------------------------------------------------
    def acquire(self) -> bool:
        """Take the lease if it is free; True when this object now holds it."""
        now = time.time()
        current = self.current()
        if current is not None and not current.free(now):
            if current.token == self.token:
                return True
            log.info("lease %s is held by %s", self.root, current.describe())
            return False
        generation = 0 if current is None else current.generation + 1
        record = LeaseRecord(self.owner, self.token, generation, now, now + self.expiry_seconds)
        if not create_exclusive(self._child(generation), self._encode(record)):
            log.info("lease %s: another scheduler took generation %d first", self.root, generation)
            return False
        if current is not None and not current.released:
            log.warning("lease %s: took over from %s, which expired", self.root, current.describe())
        self.held = record
        return True

    def still_held(self) -> bool:
        """True while no newer generation exists and ours has not expired (checked against the store)."""
        if self.held is None:
            return False
        current = self.current()
        return current is not None and current.token == self.token and not current.free(time.time())

    def renew(self) -> bool:
        """Push the expiry forward; False (and no longer held) when another holder took over."""
        if not self.still_held():
            self.held = None
            return False
        assert self.held is not None
        self.held = LeaseRecord(**{**asdict(self.held), "expires_at": time.time() + self.expiry_seconds})
        write_atomic(self._child(self.held.generation), self._encode(self.held))
        return True

    def release(self) -> None:
        """Mark our generation released so the next contender need not wait for the expiry."""
        if self.held is None:
            return
        if self.still_held():
            released = LeaseRecord(**{**asdict(self.held), "released": True})
            write_atomic(self._child(released.generation), self._encode(released))
        self.held = None

    @staticmethod
    def _encode(record: LeaseRecord) -> bytes:
        return (json.dumps(asdict(record)) + "\n").encode()

    def keep_alive(self) -> KeepAlive:
        return KeepAlive(self)


class KeepAlive:
    """Renews a lease every third of its expiry from a background thread, while a run is in progress."""

    def __init__(self, lease: Lease):
        self.lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keep-alive", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.lease.expiry_seconds / 3):
            try:
                if not self.lease.renew():
                    log.error("lease %s was lost: another scheduler took over", self.lease.root)
                    return
            except OSError as exc:  # storage hiccup: try again at the next period, before the expiry
                log.warning("could not renew lease %s: %s", self.lease.root, exc)

    def __enter__(self) -> KeepAlive:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
