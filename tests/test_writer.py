"""Sharded writing with staged, verified, atomic commits; transformers loads what we write."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import transformers
import xxhash

from distmerge.checkpoint import CheckpointIndex
from distmerge.checksum import new_hasher
from distmerge.errors import CheckpointError
from distmerge.options import RunOptions
from distmerge.reader import read_tensors
from distmerge.storage import Location, copy_tree
from distmerge.writer import CheckpointWriter, ShardRecord, pack_shards, shard_file_name, verify_shard


def write_checkpoint(source: str, dest: str, options: dict, max_shard_bytes: int, **writer_kwargs) -> list:
    tensors = read_tensors(source)
    writer = CheckpointWriter(Location(dest, options), **writer_kwargs)
    groups = pack_shards([(n, t.numel() * t.element_size()) for n, t in tensors.items()], max_shard_bytes)
    records = [writer.write_shard(shard_file_name(i, len(groups)), [(n, tensors[n]) for n in g])
               for i, g in enumerate(groups)]
    return writer, records


def test_pack_shards_respects_limit_and_order():
    sizes = [("a", 40), ("b", 40), ("c", 40), ("huge", 500), ("d", 10)]
    assert pack_shards(sizes, 100) == [["a", "b"], ["c"], ["huge"], ["d"]]
    with pytest.raises(ValueError):
        pack_shards(sizes, 0)


def test_round_trip_loads_in_transformers_on_every_backend(tiny_qwen2, remote_root, tmp_path):
    url, options = remote_root
    dest = f"{url}/merged"
    writer, records = write_checkpoint(tiny_qwen2, dest, options, 64 * 1024)
    extra = writer.stage_aux_from(tiny_qwen2, {"torch_dtype": "float32"})
    assert not Location(dest, options).child("model.safetensors.index.json").exists()
    writer.commit(records, extra)
    assert not writer.staging.exists()
    local = tmp_path / "download"
    copy_tree(Location(dest, options), Location(str(local)))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(local))
    expected = read_tensors(tiny_qwen2)
    state = model.state_dict()
    assert all(torch.equal(state[n], t) for n, t in expected.items())
    index = json.loads((local / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(records) > 1
    manifest = json.loads((local / "distmerge_manifest.json").read_text())
    assert {s["file"] for s in manifest["shards"]} == {r.file for r in records}
    for shard in manifest["shards"]:  # the published checksum is xxh3-128 of the file's bytes
        assert shard["checksum"] == "xxh3_128:" + xxhash.xxh3_128((local / shard["file"]).read_bytes()).hexdigest()


def test_bf16_tied_round_trip(tiny_llama, tmp_path):
    writer, records = write_checkpoint(tiny_llama, str(tmp_path / "out"), {}, 10**9)
    writer.commit(records, writer.stage_aux_from(tiny_llama))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.bfloat16)
    ref = read_tensors(tiny_llama)
    assert all(torch.equal(model.state_dict()[n], t) for n, t in ref.items())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_corrupted_stage_is_never_published(tiny_qwen2, remote_root):
    url, options = remote_root
    dest = Location(f"{url}/out", options)
    writer, records = write_checkpoint(tiny_qwen2, dest.url, options, 64 * 1024)
    # On S3 the record holds the object's ETag; elsewhere the shard is read back and its checksum compared.
    assert (records[0].version is not None) == url.startswith("s3://")
    victim = writer.staging.child(records[0].file)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match"):
        writer.commit(records)
    assert not dest.child("model.safetensors.index.json").exists()
    assert not any(n.endswith(".safetensors") for n in (dest.list() if dest.exists() else {}))


def test_commit_on_object_stores_reads_no_shard_back(tiny_qwen2, s3_bucket, monkeypatch):
    """The driver commits a merge on S3 without downloading it: each staged shard is checked by size and
    the ETag it had when written (one HEAD request), not read back."""
    url, options = s3_bucket
    writer, records = write_checkpoint(tiny_qwen2, f"{url}/out", options, 64 * 1024)
    read = []
    fetch = Location._fetch
    monkeypatch.setattr(Location, "_fetch", lambda self, ranges: read.append(self.url) or fetch(self, ranges))
    writer.commit(records)
    assert len(records) > 1 and not [u for u in read if u.endswith(".safetensors")], read
    assert CheckpointIndex.load(f"{url}/out", options).num_parameters == CheckpointIndex.load(tiny_qwen2).num_parameters


def test_refuses_to_overwrite_inputs_or_committed_outputs(tiny_qwen2, tmp_path):
    with pytest.raises(CheckpointError, match="one of the inputs"):
        CheckpointWriter(Location(tiny_qwen2), overwrite=True, protected=[tiny_qwen2])
    with pytest.raises(CheckpointError, match="already exists"):
        CheckpointWriter(Location(tiny_qwen2))


def test_overwrite_replaces_old_shards(tiny_qwen2, tmp_path):
    dest = str(tmp_path / "out")
    writer, records = write_checkpoint(tiny_qwen2, dest, {}, 32 * 1024)
    writer.commit(records, writer.stage_aux_from(tiny_qwen2))
    writer, records = write_checkpoint(tiny_qwen2, dest, {}, 10**9, overwrite=True)
    writer.commit(records, writer.stage_aux_from(tiny_qwen2))
    shards = [n for n in Location(dest).list() if n.endswith(".safetensors")]
    assert shards == [shard_file_name(0, 1)]
    assert CheckpointIndex.load(dest).num_parameters == CheckpointIndex.load(tiny_qwen2).num_parameters


def test_shard_record_round_trips_json():
    for version in (None, "0a1b"):
        record = ShardRecord("f.safetensors", 10, "xxh3_128:ab", ("x", "y"), 8, version)
        assert ShardRecord.from_json(json.loads(json.dumps(record.to_json()))) == record


def test_records_of_older_versions_verify_with_sha256(tiny_qwen2, tmp_path):
    # A staging written before checksums became xxh3-128 (a bare "sha256") still resumes and commits.
    writer, records = write_checkpoint(tiny_qwen2, str(tmp_path / "out"), {}, 10**9)
    shard = writer.staging.child(records[0].file)
    legacy = {**records[0].to_json(), "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}
    del legacy["checksum"]
    record = ShardRecord.from_json(legacy)
    assert record.checksum.startswith("sha256:") and verify_shard(writer.staging, record)
    assert not verify_shard(writer.staging, ShardRecord.from_json({**legacy, "sha256": "0" * 64}))
    assert not verify_shard(writer.staging, ShardRecord.from_json({**legacy, "checksum": "md4:00"}))
    assert RunOptions(verify="sha256").verify == "checksum"  # the setting's old value
    with pytest.raises(ValueError, match="unknown checksum algorithm"):
        new_hasher("md4")
