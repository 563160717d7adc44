"""A tiny model family for merge tests: a real base checkpoint and fine-tunes made by known perturbations.

The base is a tiny random Qwen2 saved by transformers (several shards, an index, a config). Fine-tunes are
the base plus deterministic perturbations, written as real checkpoints with the base's file layout:
- dense (SFT-like): every entry moves, by at least `scale / 2` in magnitude;
- sparse (RL-like): a few entries move. `rl-c` and `rl-d` have disjoint supports (one uniform draw, two
  non-overlapping bands), so RAM on them must equal the plain sum of their vectors.
Every perturbation is far above RAM's activity threshold (1e-5), so "changed" is unambiguous.

Tests compute expected results independently from the tensors on disk (`load_checkpoint`), never through
distmerge's reader.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.conftest import build_tiny_model

INDEX = "model.safetensors.index.json"
AUX = ("config.json", "generation_config.json")
FAMILY_LAYERS = 4
DENSE = {"sft-a": 1, "sft-b": 2, "other": 4}  # name -> seed; `other` is the transfer target
SPARSE_BANDS = {"rl-c": (0.0, 0.05), "rl-d": (0.5, 0.55)}  # disjoint supports from one uniform draw


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a local checkpoint directory (all *.safetensors files), optionally cast."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def shard_bytes(path: str | Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("*.safetensors"))}


def write_like(src: str | Path, dst: str | Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """Write `tensors` as a checkpoint laid out like `src` (same shard files and config); names absent
    from `tensors` are left out of the shards and the index."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in AUX:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    if not (src / INDEX).exists():  # a single-file checkpoint
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
        return str(dst)
    weight_map = json.loads((src / INDEX).read_text())["weight_map"]
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        by_file.setdefault(weight_map.get(name, next(iter(weight_map.values()))), {})[name] = tensor.contiguous()
    for file, group in by_file.items():
        save_file(group, str(dst / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, g in by_file.items() for n in g}}
    (dst / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return str(dst)


def perturbation(shape: torch.Size, gen: torch.Generator, scale: float) -> torch.Tensor:
    """Random signs times magnitudes in [scale / 2, 3 scale / 2): no entry is near zero."""
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return sign * scale * (0.5 + torch.rand(shape, generator=gen))


def derive(src: str | Path, dst: str | Path, edit: Callable[[str, torch.Tensor], torch.Tensor | None]) -> str:
    """A copy of checkpoint `src` with `edit(name, tensor)` applied (None drops the tensor)."""
    tensors = {}
    for name, tensor in sorted(load_checkpoint(src).items()):
        edited = edit(name, tensor)
        if edited is not None:
            tensors[name] = edited
    return write_like(src, dst, tensors)


def finetune(src: str | Path, dst: str | Path, seed: int, scale: float = 0.01,
             band: tuple[float, float] | None = None) -> str:
    """`src` plus a perturbation (in fp32, then cast back): dense, or only where a uniform draw is in `band`."""
    gen = torch.Generator().manual_seed(seed)

    def edit(name: str, tensor: torch.Tensor) -> torch.Tensor:
        delta = perturbation(tensor.shape, gen, scale)
        if band is not None:
            u = torch.rand(tensor.shape, generator=gen)
            delta = torch.where((u >= band[0]) & (u < band[1]), delta, torch.zeros_like(delta))
        return (tensor.float() + delta).to(tensor.dtype)

    return derive(src, dst, edit)


def build_family(root: str | Path, dtype: torch.dtype = torch.float32,
                 num_layers: int = FAMILY_LAYERS) -> dict[str, str]:
    """base, dense sft-a / sft-b / other, sparse disjoint rl-c / rl-d, and grpo = sft-a + a sparse update."""
    root = Path(root)
    family = {"base": build_tiny_model(root / "base", "qwen2", seed=0, dtype=dtype,
                                       num_hidden_layers=num_layers, shard="120KB")}
    for name, seed in DENSE.items():
        family[name] = finetune(family["base"], root / name, seed)
    for i, (name, band) in enumerate(SPARSE_BANDS.items()):
        family[name] = finetune(family["base"], root / name, seed=10, band=band, scale=0.01 + 0.005 * i)
    family["grpo"] = finetune(family["sft-a"], root / "grpo", seed=20, band=(0.0, 0.1), scale=0.005)
    return family


def generate(path: str | Path, new_tokens: int = 4) -> torch.Tensor:
    """Load with transformers and greedily generate: proves the output is a usable checkpoint."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
        assert torch.isfinite(logits).all(), f"{path}: non-finite logits"
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (1, 3 + new_tokens)
    return out


def vectors(family: Mapping[str, str], names: list[str], base: str = "base") -> tuple[dict, list[dict]]:
    """fp32 base tensors and fp32 task vectors tau_i = theta_i - theta_0 of `names`."""
    theta0 = load_checkpoint(family[base], torch.float32)
    taus = []
    for name in names:
        theta = load_checkpoint(family[name], torch.float32)
        taus.append({k: theta[k] - theta0[k] for k in theta0})
    return theta0, taus
