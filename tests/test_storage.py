"""The storage edge on file://, memory:// and a real S3 API (moto on loopback)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from distmerge.errors import StorageError
from distmerge.storage import Location, coalesce_ranges
from tests.conftest import s3_options
from tests.s3_proxy import CountingProxy

DATA = bytes(range(256)) * 64  # 16 KiB


def test_list_exists_size_and_reads(remote_root):
    url, options = remote_root
    root = Location(url, options)
    f = root.child("dir/blob.bin")
    f.write_bytes(DATA)
    assert f.exists() and not root.child("dir/nope").exists()
    assert f.size() == len(DATA)
    assert "blob.bin" in root.child("dir").list()
    assert f.read_range(10, 20) == DATA[10:20]
    assert f.read_range(5, 5) == b""
    ranges = [(0, 4), (100, 200), (16000, 16384), (50, 60)]
    assert f.read_ranges(ranges) == [DATA[s:e] for s, e in ranges]
    assert f.read_ranges(ranges, max_gap=0) == [DATA[s:e] for s, e in ranges]


@pytest.mark.parametrize("start,end,message", [(20, 10, "start is after end"), (0, 99999, "past the end"),
                                               (-1, 3, "negative")])
def test_invalid_ranges_are_refused_on_every_backend(remote_root, start, end, message):
    url, options = remote_root
    f = Location(url, options).child("blob.bin")
    f.write_bytes(DATA)
    with pytest.raises(StorageError, match=message):
        f.read_range(start, end)


def test_missing_file_names_url_and_fix(remote_root):
    url, options = remote_root
    missing = Location(url, options).child("absent.bin")
    with pytest.raises(StorageError, match="absent.bin.*not found"):
        missing.read_bytes()


def test_unreachable_endpoint_is_a_clear_error():
    loc = Location("s3://bucket/x", {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s",
                                     "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}})
    with pytest.raises(StorageError, match="s3://bucket/x"):
        loc.read_bytes()


def test_denied_permission_is_a_clear_error(tmp_path):
    # A real EACCES: as root the check runs as `nobody` (root ignores file modes).
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"x")
    secret.chmod(0)
    cmd = [sys.executable, "-c", f"from distmerge.storage import Location; Location({str(secret)!r}).read_bytes()"]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "permission denied" in result.stderr and "secret.bin" in result.stderr


def test_missing_bucket_is_a_clear_error(s3_bucket):
    _, options = s3_bucket
    with pytest.raises(StorageError, match="no-such-bucket-xyz.*not found"):
        Location("s3://no-such-bucket-xyz/x.bin", options).read_bytes()


def test_s3_small_read_transfers_only_what_was_asked(s3_endpoint, s3_bucket):
    url, options = s3_bucket
    big = Location(url, options).child("big.bin")
    big.write_bytes(b"\0" * (4 << 20))
    with CountingProxy(s3_endpoint) as proxy:
        via_proxy = Location(big.url, {**s3_options(proxy.endpoint)})
        proxy.reset()
        assert via_proxy.read_range(100, 108, file_size=4 << 20) == b"\0" * 8
        assert proxy.bytes_sent <= 64, proxy.requests


def test_coalesce_groups_nearby_ranges():
    groups = coalesce_ranges([(0, 10), (12, 20), (1000, 1010)], max_gap=5)
    assert groups == [(0, 20, [0, 1]), (1000, 1010, [2])]


def test_location_pickles_without_its_filesystem():
    import pickle

    loc = Location("memory://x/y", {"skip_instance_cache": True})
    loc.fs  # noqa: B018
    clone = pickle.loads(pickle.dumps(loc))
    assert clone == loc and clone._fs is None
    assert "skip_instance_cache" not in repr(loc)
