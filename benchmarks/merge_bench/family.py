"""A synthetic Qwen2-shaped family in bf16: a base, two dense SFT-like fine-tunes, one sparse RL-like one.

Sharded safetensors with an index and config.json, like `save_pretrained` writes them, built once and cached
under <root>/family-<size>-<hash of the settings>/. Tensors come from the model's own state dict on the meta
device (real names and shapes, nothing allocated); values are seeded per (seed, role, tensor name), so a
family is reproducible. Fine-tune noise is relative to each tensor's RMS: a dense update touches every entry,
a sparse one a few percent.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from merge_bench.log import log

FAMILY_FORMAT = 2  # bump when the generator changes: the family hash includes it

# Qwen2 shapes (transformers' Qwen2Config), tied embeddings, bf16.
SIZES: dict[str, dict] = {
    # ~57M parameters, the proportions of 0.5B (embedding ~29% of the parameters): for quick iteration.
    "50m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=2816, vocab_size=32000, shard_mb=48),
    # Qwen2-0.5B shapes: ~494M parameters, ~0.99 GB per checkpoint.
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, shard_mb=512),
    # Qwen2-1.5B shapes: ~1.54B parameters, ~3.1 GB per checkpoint.
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, shard_mb=1536),
}

# (role, kind, noise scale relative to the tensor's RMS, fraction of entries changed)
FINETUNES = (
    ("sft-a", "dense", 0.05, 1.0),
    ("sft-b", "dense", 0.05, 1.0),
    ("rl", "sparse", 0.05, 0.03),
)


@dataclass
class Family:
    root: Path
    size: str
    num_params: int
    dirs: dict[str, Path]  # role -> checkpoint folder: base, then the fine-tunes
    input_bytes: int  # safetensors bytes of base + fine-tunes: what every tool has to read

    @property
    def models(self) -> list[str]:
        return [role for role, *_ in FINETUNES]


def _config(size: str):
    from transformers import Qwen2Config

    shape = {k: v for k, v in SIZES[size].items() if k != "shard_mb"}
    return Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
                       rms_norm_eps=1e-6, dtype="bfloat16", architectures=["Qwen2ForCausalLM"])


def _tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in storage order, from a model on the meta device; a tied lm_head is not stored."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()
            if not (config.tie_word_embeddings and name == "lm_head.weight")]


def _generator(*parts):
    import torch

    seed = int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(seed)


def _base_tensor(name: str, shape, seed: int):
    import torch

    values = torch.randn(shape, generator=_generator(seed, "base", name), dtype=torch.float32)
    if name.endswith("norm.weight"):
        return (1.0 + 0.05 * values).to(torch.bfloat16)  # RMSNorm weights around 1
    return (0.02 * values).to(torch.bfloat16)


def _finetune_tensor(base_bf16, name: str, seed: int, role: str, kind: str, scale: float, fraction: float):
    import torch

    gen = _generator(seed, role, name)
    base = base_bf16.float()
    rms = base.pow(2).mean().sqrt().clamp(min=1e-3)
    noise = torch.randn(base.shape, generator=gen, dtype=torch.float32).mul_(scale * float(rms))
    if kind == "sparse":
        noise = torch.where(torch.rand(base.shape, generator=gen) < fraction, noise, torch.zeros_like(noise))
    return base.add_(noise).to(torch.bfloat16)


def _pack(shapes, shard_bytes: int) -> list[list[str]]:
    shards, current, used = [], [], 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if current and used + nbytes > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    return shards + ([current] if current else [])


def build_family(root: Path, size: str, seed: int = 0) -> Family:
    """The family under root/family-<size>-<hash>/, built unless its family.json exists."""
    settings = {"format": FAMILY_FORMAT, "size": size, "shape": SIZES[size], "seed": seed,
                "finetunes": [list(m) for m in FINETUNES], "dtype": "bfloat16"}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = root / f"family-{size}-{digest}"
    roles = ["base", *[role for role, *_ in FINETUNES]]
    manifest_path = folder / "family.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        log(f"reusing family {folder} ({manifest['num_params'] / 1e6:.0f}M params)")
        return Family(folder, size, manifest["num_params"], {r: folder / r for r in roles}, manifest["input_bytes"])

    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(os.cpu_count() or 1)
    shutil.rmtree(folder, ignore_errors=True)
    config = _config(size)
    shapes = _tensor_shapes(config)
    num_params = sum(math.prod(s) for _, s in shapes)
    shards = _pack(shapes, SIZES[size]["shard_mb"] * 2**20)
    shape_of = dict(shapes)
    log(f"building family {folder}: {num_params / 1e6:.0f}M params x {len(roles)} checkpoints, "
        f"{len(shards)} shard(s) each")
    start = time.perf_counter()
    for role in roles:
        (folder / role).mkdir(parents=True)
        config.save_pretrained(folder / role)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards, strict=True):
        base = {n: _base_tensor(n, shape_of[n], seed) for n in names}
        save_file(base, str(folder / "base" / file), metadata={"format": "pt"})
        for role, kind, scale, fraction in FINETUNES:
            tuned = {n: _finetune_tensor(base[n], n, seed, role, kind, scale, fraction) for n in names}
            save_file(tuned, str(folder / role / file), metadata={"format": "pt"})
        log(f"  wrote {file} ({time.perf_counter() - start:.0f}s)")
    index = {"metadata": {"total_size": 2 * num_params},
             "weight_map": {n: f for f, names in zip(files, shards, strict=True) for n in names}}
    for role in roles:
        (folder / role / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    input_bytes = sum(p.stat().st_size for r in roles for p in (folder / r).glob("*.safetensors"))
    manifest = {"settings": settings, "num_params": num_params, "input_bytes": input_bytes,
                "build_seconds": round(time.perf_counter() - start, 1)}
    tmp = folder / ".family.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)  # written last: a family without it is rebuilt
    log(f"family built in {manifest['build_seconds']}s")
    return Family(folder, size, num_params, {r: folder / r for r in roles}, input_bytes)


def warm_page_cache(family: Family) -> None:
    """Read every input file once, so every run starts from the same warm page cache."""
    for folder in family.dirs.values():
        for path in sorted(folder.glob("*.safetensors")):
            with open(path, "rb") as fh:
                while fh.read(64 << 20):
                    pass
