"""Shared fixtures: network hygiene, tiny real transformers checkpoints, a real S3 API on loopback (moto)."""

from __future__ import annotations

import os
import socket
import uuid

# Network hygiene before anything imports ray/vllm/transformers.
for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
    "AWS_EC2_METADATA_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

from distmerge.storage import Location, copy_tree  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_tiny_model(path, arch: str = "qwen2", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """Save a tiny randomly initialised real transformers model (safetensors) and return its path."""
    import transformers

    torch.manual_seed(seed)
    shard = overrides.pop("shard", "200KB")
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    common.update(overrides)
    if arch == "qwen2":
        config = transformers.Qwen2Config(tie_word_embeddings=False, **common)
        model = transformers.Qwen2ForCausalLM(config)
    elif arch == "llama":
        config = transformers.LlamaConfig(tie_word_embeddings=True, **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        raise ValueError(arch)
    model = model.to(dtype)
    model.save_pretrained(str(path), safe_serialization=True, max_shard_size=shard)
    return str(path)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    """Sharded Qwen2 checkpoint (index + several shards), float32, untied embeddings."""
    return build_tiny_model(tmp_path_factory.mktemp("qwen2") / "model", "qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Llama checkpoint with tied embeddings, bf16."""
    return build_tiny_model(tmp_path_factory.mktemp("llama") / "model", "llama", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's threaded server) on 127.0.0.1; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[key] = value
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield endpoint
    finally:
        server.stop()


def s3_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}


@pytest.fixture
def s3_bucket(s3_endpoint, request) -> tuple[str, dict]:
    """A fresh bucket; yields (s3 URL prefix, storage options)."""
    import s3fs

    options = s3_options(s3_endpoint)
    fs = s3fs.S3FileSystem(**options)
    name = f"bucket-{uuid.uuid4().hex[:16]}"
    fs.mkdir(name)
    return f"s3://{name}", options


@pytest.fixture(params=["file", "memory", "s3"])
def remote_root(request, tmp_path) -> tuple[str, dict]:
    """A writable root URL on each backend: (url, storage options)."""
    if request.param == "file":
        return f"file://{tmp_path}", {}
    if request.param == "memory":
        return f"memory://{request.node.name.replace('[', '-').replace(']', '')}-{os.getpid()}", {}
    return request.getfixturevalue("s3_bucket")


def upload(local_dir: str, url: str, options: dict | None = None) -> str:
    copy_tree(Location(local_dir), Location(url, options))
    return url


def make_finetune(base_dir: str, out_dir: str, seed: int, scale: float = 0.02, density: float = 1.0) -> str:
    """A checkpoint shaped like `base_dir`: base + a deterministic perturbation on a `density` fraction of entries."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    shutil.copytree(base_dir, out_dir, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    index = json.loads((Path(base_dir) / "model.safetensors.index.json").read_text())
    for file in sorted(set(index["weight_map"].values())):
        tensors = load_file(f"{base_dir}/{file}")
        out = {}
        for name in sorted(tensors):
            t = tensors[name]
            noise = torch.randn(t.shape, generator=gen) * scale
            keep = torch.rand(t.shape, generator=gen) < density
            out[name] = (t.float() + noise * keep).to(t.dtype)
        save_file(out, f"{out_dir}/{file}", metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, str]:
    """base + two dense (SFT-like) and one sparse (RL-like) fine-tune of a 4-layer tiny Qwen2."""
    root = tmp_path_factory.mktemp("family")
    base = build_tiny_model(root / "base", "qwen2", num_hidden_layers=4, shard="120KB")
    return {
        "base": base,
        "sft-a": make_finetune(base, str(root / "sft-a"), 1),
        "sft-b": make_finetune(base, str(root / "sft-b"), 2),
        "rl-c": make_finetune(base, str(root / "rl-c"), 3, scale=0.01, density=0.05),
    }


@pytest.fixture(scope="session")
def bf16_family(tmp_path_factory) -> dict[str, str]:
    """Like tiny_family, in bf16: task vectors are differences of bf16 values, so many magnitudes repeat and
    the tie rules at every threshold and band bound are exercised."""
    root = tmp_path_factory.mktemp("bf16-family")
    base = build_tiny_model(root / "base", "qwen2", num_hidden_layers=2, dtype=torch.bfloat16, shard="60KB")
    return {
        "base": base,
        "sft-a": make_finetune(base, str(root / "sft-a"), 1),
        "sft-b": make_finetune(base, str(root / "sft-b"), 2),
        "rl-c": make_finetune(base, str(root / "rl-c"), 3, scale=0.01, density=0.05),
    }


TESTBED_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "testbed-tests")


@pytest.fixture(scope="session")
def testbed_tiny():
    """The tiny testbed family (real trained Qwen2 models), built once and cached by content hash under
    .cache/testbed-tests, so every module that needs it (testbed, eval, production) shares one build."""
    from distmerge.testbed import build_family

    return build_family(os.path.join(TESTBED_CACHE, "tiny-0"), size="tiny", seed=0, progress=False)
