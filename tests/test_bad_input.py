"""Malformed checkpoints fail with a message naming the file, the tensor and the fix; nothing is written."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from distmerge.checkpoint import CheckpointIndex
from distmerge.cli import cli, main
from distmerge.errors import CheckpointError, StorageError
from distmerge.storage import Location
from tests.conftest import upload

GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


def raw_file(header: dict | bytes, data: bytes = b"\0" * 16, length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def put(root: Location, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        root.child(name).write_bytes(data)
    return root.url


CASES = {
    "truncated": ({"model.safetensors": b"\x01\x02"}, "truncated"),
    "header_too_long": ({"model.safetensors": raw_file(GOOD, length=10**6)}, "header length .* past the end"),
    "bad_json": ({"model.safetensors": raw_file(b"{not json")}, "invalid header JSON"),
    "outside_data": ({"model.safetensors": raw_file(
        {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}})}, "'w'.*outside the data section"),
    "overlap": ({"model.safetensors": raw_file({
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})}, "'b'.*overlaps tensor 'a'"),
    "unknown_dtype": ({"model.safetensors": raw_file(
        {"w": {"dtype": "F12", "shape": [2, 2], "data_offsets": [0, 16]}})}, "'w'.*unknown dtype 'F12'"),
    "shape_mismatch": ({"model.safetensors": raw_file(
        {"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}})}, r"'w'.*needs 24 bytes but .* 16"),
    "duplicate": ({"model.safetensors": raw_file(
        b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    )}, "'w'.*duplicate tensor name"),
    "index_missing_file": ({
        "model.safetensors.index.json": json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors",
                                                                   "v": "model-00002-of-00002.safetensors"}}).encode(),
        "model-00001-of-00002.safetensors": raw_file(GOOD)}, "missing file.*00002"),
    "index_missing_tensor": ({
        "model.safetensors.index.json": json.dumps({"weight_map": {"w": "a.safetensors", "ghost": "a.safetensors"}}
                                                   ).encode(),
        "a.safetensors": raw_file(GOOD)}, "'ghost'.*header lacks it"),
    "pickle": ({"pytorch_model.bin": b"\x80\x04pickle"}, "pickle.*runs arbitrary code"),
    "empty": ({"README.md": b"hello"}, "no safetensors weights"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_checkpoint_is_a_clear_error(case, remote_root):
    url, options = remote_root
    files, pattern = CASES[case]
    root = Location(f"{url}/{case}", options)
    put(root, files)
    with pytest.raises(CheckpointError, match=pattern) as info:
        CheckpointIndex.load(root.url, options)
    assert "Fix:" in str(info.value)
    assert set(root.list()) == set(files)  # nothing written


def test_missing_url_is_a_storage_error(remote_root):
    url, options = remote_root
    with pytest.raises(StorageError, match="not found"):
        CheckpointIndex.load(f"{url}/never-uploaded", options)


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    put(Location(str(tmp_path)), CASES["unknown_dtype"][0])
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: file model.safetensors, tensor 'w': unknown dtype") and "Traceback" not in err


def test_console_script_keeps_its_exit_status_and_output(tmp_path):
    """The `distmerge` script ends with os._exit (skipping interpreter teardown): the status and everything it
    printed still come through, as from the in-process command."""
    script = str(Path(sys.executable).with_name("distmerge"))
    put(Location(str(tmp_path)), CASES["unknown_dtype"][0])
    bad = subprocess.run([script, "inspect", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error: file model.safetensors, tensor 'w': unknown dtype")
    listed = subprocess.run([script, "methods"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == CliRunner().invoke(cli, ["methods"]).output
    assert subprocess.run([script, "no-such-command"], capture_output=True, timeout=120).returncode == 2


def test_truncated_data_section_fails_on_read_not_silently(tiny_qwen2, tmp_path):
    upload(tiny_qwen2, str(tmp_path / "m"))
    shard = sorted(p for p in (tmp_path / "m").iterdir() if p.suffix == ".safetensors")[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="outside the data section"):
        CheckpointIndex.load(str(tmp_path / "m"))
