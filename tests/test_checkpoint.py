"""Indexing from headers only, reading tensors, and `distmerge inspect`, on every backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from distmerge.checkpoint import CheckpointIndex
from distmerge.cli import cli
from distmerge.reader import TensorReader, read_tensors
from distmerge.storage import Location
from tests.conftest import s3_options, upload
from tests.s3_proxy import CountingProxy


def reference_tensors(local_dir: str) -> dict[str, torch.Tensor]:
    index = json.load(open(f"{local_dir}/model.safetensors.index.json"))
    out = {}
    for file in set(index["weight_map"].values()):
        out.update(load_file(f"{local_dir}/{file}"))
    return out


def test_index_of_sharded_qwen2(tiny_qwen2):
    index = CheckpointIndex.load(tiny_qwen2)
    ref = reference_tensors(tiny_qwen2)
    assert set(index.names) == set(ref)
    assert index.num_parameters == sum(t.numel() for t in ref.values())
    assert len(index.files) > 1 and index.num_layers == 2 and not index.tied_embeddings
    assert index.layer_of("model.layers.1.mlp.up_proj.weight") == 1
    assert index.layer_of("model.embed_tokens.weight") is None
    assert index.kind_of("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert index.kind_of("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert index.kind_of("model.layers.0.input_layernorm.weight") == "norm"
    assert index.kind_of("lm_head.weight") == "lm_head"
    summary = index.summary()
    assert summary["final_norm"] == ["model.norm.weight"] and summary["architecture"] == "Qwen2ForCausalLM"


def test_tied_llama_in_bf16(tiny_llama):
    index = CheckpointIndex.load(tiny_llama)
    assert index.tied_embeddings and "lm_head.weight" not in index.tensors
    assert index.dtype_counts() == {"BF16": index.num_parameters}


def test_read_equals_safetensors_on_every_backend(tiny_qwen2, remote_root):
    url, options = remote_root
    upload(tiny_qwen2, f"{url}/ckpt", options)
    index = CheckpointIndex.load(f"{url}/ckpt", options)
    ref = reference_tensors(tiny_qwen2)
    with TensorReader(index) as reader:
        got = reader.read(index.names)
        up = reader.read(["model.norm.weight"], dtype=torch.float32)
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    assert up["model.norm.weight"].dtype == torch.float32


def test_bf16_upcast(tiny_llama):
    got = read_tensors(tiny_llama, ["model.norm.weight"], dtype=torch.float32)["model.norm.weight"]
    ref = reference_tensors_single(tiny_llama)["model.norm.weight"]
    assert got.dtype == torch.float32 and torch.equal(got, ref.float())


def reference_tensors_single(local_dir: str) -> dict[str, torch.Tensor]:
    try:
        return reference_tensors(local_dir)
    except FileNotFoundError:
        return load_file(f"{local_dir}/model.safetensors")


def test_single_file_url(tiny_llama):
    files = [p for p in Location(tiny_llama).list() if p.endswith(".safetensors")]
    index = CheckpointIndex.load(f"{tiny_llama}/{files[0]}")
    assert index.names and all(t.file == files[0] for t in index.tensors.values())


def test_indexing_on_s3_transfers_only_headers_and_json(tiny_qwen2, s3_endpoint, s3_bucket):
    url, options = s3_bucket
    upload(tiny_qwen2, f"{url}/ckpt", options)
    listing = Location(f"{url}/ckpt", options).list()
    weights = sum(int(v["size"]) for k, v in listing.items() if k.endswith(".safetensors"))
    json_bytes = sum(int(v["size"]) for k, v in listing.items() if k.endswith(".json"))
    with CountingProxy(s3_endpoint) as proxy:
        index = CheckpointIndex.load(f"{url}/ckpt", s3_options(proxy.endpoint))
        header_bytes = sum(8 + (h.data_start - 8) for h in index.files.values())
        gets = [r for r in proxy.requests if r[0] == "GET" and "list-type" not in r[1]]
    listing_overhead = 16 * 1024  # the one LIST response (XML)
    assert proxy.bytes_sent <= header_bytes + json_bytes + listing_overhead
    assert proxy.bytes_sent < weights / 4
    assert all(r[2] is not None for r in gets if r[1].endswith(".safetensors"))  # ranged GETs only


def test_inspect_cli_text_and_json(tiny_qwen2):
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", tiny_qwen2, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["num_layers"] == 2 and data["num_tensors"] == 27 and data["dtypes"] == {"F32": data["num_parameters"]}
    assert len(data["shards"]) > 1
    text = runner.invoke(cli, ["inspect", tiny_qwen2]).output
    assert "Qwen2ForCausalLM" in text and "tied embedding no" in text


def test_inspect_s3_with_storage_options(tiny_qwen2, s3_bucket):
    url, options = s3_bucket
    upload(tiny_qwen2, f"{url}/m", options)
    result = CliRunner().invoke(cli, ["inspect", f"{url}/m", "--json", "--storage-options", json.dumps(options)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["num_layers"] == 2


def test_fingerprint_is_stable_and_content_sensitive(tiny_qwen2, tmp_path):
    from tests.conftest import build_tiny_model

    first = CheckpointIndex.load(tiny_qwen2).fingerprint()
    upload(tiny_qwen2, str(tmp_path / "copy"))
    assert CheckpointIndex.load(str(tmp_path / "copy")).fingerprint() == first
    other = build_tiny_model(tmp_path / "other", "qwen2", intermediate_size=96)
    assert CheckpointIndex.load(other).fingerprint() != first


def mapped_rss_kib(path: str) -> int:
    """This process's resident KiB of the mappings of file `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split()[0] and len(line.split()) >= 5:  # a mapping's header line
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_release_unmaps_pages_and_keeps_views_readable(tmp_path):
    """A mapped tensor's pages leave the process's RSS on release; a view still alive reads the same bytes."""
    big = torch.arange(4 * 1024 * 1024, dtype=torch.float32).reshape(1024, 4096)  # 16 MiB, 16 KiB rows
    save_file({"big": big, "small": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    index = CheckpointIndex.load(str(tmp_path))
    with TensorReader(index) as reader:
        view = reader.read(["big"])["big"]
        assert torch.equal(view, big)  # touches every page
        path = str(tmp_path / "model.safetensors")
        assert mapped_rss_kib(path) >= 15 * 1024
        reader.release("big", 0, 512)  # rows: half the tensor
        assert 7 * 1024 <= mapped_rss_kib(path) <= 9 * 1024
        reader.release("big")
        assert mapped_rss_kib(path) < 1024
        assert torch.equal(view, big)  # faults back in from the page cache
        reader.release("small")  # less than a page: nothing to unmap, no error
