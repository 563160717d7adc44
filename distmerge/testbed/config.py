"""Build settings of a testbed family, per size, and the content hash that keys the build cache.

Key decisions:
- Two sizes. "small" follows testbed.md's "What worked" (Qwen2 192 hidden / 3 layers / 6 heads / 2 KV heads,
  MLP 512, ~1.2M parameters, 4 tasks, base 600 steps at lr 1e-3, specialists 400 steps at lr 1e-4 with 25%
  replay, GRPO on reversal from a 40-step SFT). "tiny" keeps the same kinds of models and stages at a size
  that builds in seconds, for tests; its accuracies are not meant to be good.
- Every number that changes the weights lives here, in frozen dataclasses, so it is hashed and recorded in
  family.json. Things that do not change the weights (worker count, progress bars) are not settings.
- The cache key hashes the settings together with the testbed's own source code and the torch and
  transformers versions: editing the training code, or upgrading torch, invalidates a cached family.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from distmerge.testbed.grpo import GRPOSettings
from distmerge.testbed.training import ModelShape, TrainSettings

SIZES = ("tiny", "small")


@dataclass(frozen=True)
class FamilySettings:
    """Everything that determines the weights of a family, besides the code."""

    size: str
    seed: int
    tasks: tuple[str, ...]
    shape: ModelShape
    base: TrainSettings
    sft: TrainSettings
    weak_sft: TrainSettings  # the starting point of GRPO, trained like a specialist but briefly
    grpo: GRPOSettings
    base_hard_fraction: float = 0.01  # the base sees hard instances only rarely, so it stays weak on them
    sft_hard_fraction: float = 0.75  # a specialist's own-task instances that are hard (the rest easy)
    replay: float = 0.25  # share of base-mixture instances in a specialist's data
    eval_n_per_task: int = 500
    eval_seed: int = 0
    gate_base_max: float = 0.3
    gate_specialist_min: float = 0.8

    def to_dict(self) -> dict:
        return asdict(self)


def family_settings(size: str = "small", seed: int = 0) -> FamilySettings:
    """The settings for a family of `size` ("tiny" or "small") built from `seed`."""
    if size == "small":
        return FamilySettings(
            size=size, seed=seed, tasks=("addition", "reversal", "sorting", "uppercase"),
            shape=ModelShape(hidden_size=192, num_layers=3, num_heads=6, num_kv_heads=2, intermediate_size=512),
            base=TrainSettings(steps=600, lr=1e-3),
            sft=TrainSettings(steps=400, lr=1e-4),
            weak_sft=TrainSettings(steps=40, lr=1e-4),
            grpo=GRPOSettings(task="reversal", steps=50, lr=3e-5, num_prompts=32, num_samples=8),
        )
    if size == "tiny":
        # Head size 64 / 2 = 32, the vLLM minimum. Only the plumbing has to work at this size.
        return FamilySettings(
            size=size, seed=seed, tasks=("reversal", "uppercase"),
            shape=ModelShape(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128),
            base=TrainSettings(steps=600, lr=3e-3, batch_size=32),
            sft=TrainSettings(steps=20, lr=3e-4, batch_size=32),
            weak_sft=TrainSettings(steps=10, lr=3e-4, batch_size=32),
            # Easy RL prompts: the tiny weak SFT solves a few, so rewards vary within groups and GRPO moves.
            grpo=GRPOSettings(task="reversal", steps=4, lr=1e-4, num_prompts=16, num_samples=8, hard_fraction=0.0),
            base_hard_fraction=0.1, eval_n_per_task=64,
        )
    raise ValueError(f"unknown family size {size!r}; choose one of {SIZES}")


def code_version() -> str:
    """A digest of the testbed package's source files: any code change gives a new version."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def settings_hash(settings: FamilySettings) -> str:
    """The cache key of a build: settings + testbed code + torch/transformers versions."""
    import torch
    import transformers

    payload = {"settings": settings.to_dict(), "code": code_version(), "torch": torch.__version__,
               "transformers": transformers.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def derive_seed(seed: int, name: str) -> int:
    """A stable per-model seed, so each job's randomness does not depend on which process runs it."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little") % (2**31)
