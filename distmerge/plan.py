"""Planning: from headers only, decide what every worker will compute and write.

A plan checks that base, models and target agree on tensor names, shapes and dtypes (a mismatch is an error
naming the tensor and both checkpoints, never a silent skip), resolves each output tensor's dtype and LiNeS
scale inputs (layer index), and cuts the tensors, in storage order, into blocks of about `block_size` output
bytes. Each block is exactly one output shard, so a worker that owns a block writes its shard alone and the
driver only commits. The plan is plain data (JSON), hashed for provenance and for safe resumes; the
single-process and Ray executors consume the same plan.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from distmerge import architecture
from distmerge.checkpoint import CheckpointIndex
from distmerge.errors import MergeError
from distmerge.options import DEFAULT_BLOCK_SIZE
from distmerge.safetensors_format import DTYPE_NAMES, DTYPES, FLOAT_DTYPES, dtype_size
from distmerge.writer import pack_shards, shard_file_name

PLAN_VERSION = 1


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    out_dtype: str  # safetensors dtype name
    layer: int | None
    kind: str
    merge: bool  # False: copied from the target unchanged (non-float tensors)
    alias_of: str | None = None  # tied lm_head stored twice: written from its embedding's result

    @property
    def out_bytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * dtype_size(self.out_dtype)


@dataclass(frozen=True)
class Block:
    id: int
    file: str
    tensors: tuple[str, ...]
    nbytes: int


@dataclass
class Plan:
    inputs: dict[str, Any]  # role -> {url, fingerprint}; roles: base, target, model:<name>
    model_names: list[str]
    num_layers: int
    tensors: dict[str, TensorPlan]
    blocks: list[Block]
    recipe: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version, "recipe": self.recipe, "inputs": self.inputs, "model_names": self.model_names,
            "num_layers": self.num_layers, "tensors": [asdict(t) for t in self.tensors.values()],
            "blocks": [asdict(b) for b in self.blocks],
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Plan:
        tensors = {t["name"]: TensorPlan(**{**t, "shape": tuple(t["shape"])}) for t in raw["tensors"]}
        blocks = [Block(**{**b, "tensors": tuple(b["tensors"])}) for b in raw["blocks"]]
        return cls(raw["inputs"], raw["model_names"], raw["num_layers"], tensors, blocks, raw["recipe"],
                   raw["version"])

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def build_plan(
    base: CheckpointIndex, models: Mapping[str, CheckpointIndex], target: CheckpointIndex,
    *, out_dtype: str = "auto", block_size: int = DEFAULT_BLOCK_SIZE, recipe: Mapping[str, Any] | None = None,
) -> Plan:
    """Validate the inputs against each other and cut the output into blocks (= shards)."""
    roles = {"base": base, **{f"model:{n}": idx for n, idx in models.items()}, "target": target}
    check_compatible(roles)
    tied = target.tied_embeddings
    embed = architecture.embedding_name(target.names)
    tensors: dict[str, TensorPlan] = {}
    for name in _storage_order(target):
        entry = target.tensors[name]
        is_float = entry.dtype in FLOAT_DTYPES
        dtype = entry.dtype if out_dtype == "auto" or not is_float else DTYPE_NAMES[getattr(torch, out_dtype)]
        alias = embed if tied and embed and architecture.tensor_kind(name) == "lm_head" else None
        tensors[name] = TensorPlan(name, entry.shape, dtype, architecture.layer_index(name),
                                   architecture.tensor_kind(name), is_float, alias)
    order = _aliases_next_to_sources(list(tensors), tensors)
    groups = pack_shards([(n, tensors[n].out_bytes) for n in order], block_size)
    groups = _keep_aliases_with_sources(groups, tensors)
    blocks = [Block(i, shard_file_name(i, len(groups)), tuple(g), sum(tensors[n].out_bytes for n in g))
              for i, g in enumerate(groups)]
    inputs = {role: {"url": idx.url, "fingerprint": idx.fingerprint()} for role, idx in roles.items()}
    return Plan(inputs, list(models), target.num_layers, tensors, blocks, dict(recipe or {}))


def check_compatible(roles: Mapping[str, CheckpointIndex], *, same_dtypes: bool = True) -> None:
    """Same tensor names and shapes (and dtypes) in every checkpoint; the error names the tensor and both."""
    (ref_role, ref), *others = roles.items()
    for role, idx in others:
        missing = [n for n in ref.names if n not in idx.tensors]
        extra = [n for n in idx.names if n not in ref.tensors]
        if missing or extra:
            name = (missing or extra)[0]
            where = f"in {_label(ref_role)} but not in {_label(role)}" if missing else \
                f"in {_label(role)} but not in {_label(ref_role)}"
            raise MergeError(
                f"tensor {name} is {where} ({len(missing)} missing, {len(extra)} extra); all checkpoints must "
                "share one architecture. Fix: check that every model was fine-tuned from the same base"
            )
        for name, entry in ref.tensors.items():
            other = idx.tensors[name]
            if other.shape != entry.shape:
                raise MergeError(f"tensor {name} has shape {list(entry.shape)} in {_label(ref_role)} but "
                                 f"{list(other.shape)} in {_label(role)}; merged models must share shapes")
            if same_dtypes and other.dtype != entry.dtype:
                raise MergeError(f"tensor {name} has dtype {entry.dtype} in {_label(ref_role)} but {other.dtype} "
                                 f"in {_label(role)}; convert the checkpoints to one dtype before merging")


def _label(role: str) -> str:
    return role.split(":", 1)[1] if role.startswith("model:") else role


def _storage_order(index: CheckpointIndex) -> list[str]:
    return sorted(index.names, key=lambda n: (index.tensors[n].file, index.tensors[n].start))


def _aliases_next_to_sources(order: list[str], tensors: Mapping[str, TensorPlan]) -> list[str]:
    aliases = [n for n in order if tensors[n].alias_of]
    rest = [n for n in order if not tensors[n].alias_of]
    for alias in aliases:
        rest.insert(rest.index(tensors[alias].alias_of) + 1, alias)
    return rest


def _keep_aliases_with_sources(groups: list[list[str]], tensors: Mapping[str, TensorPlan]) -> list[list[str]]:
    # A tied lm_head must be written by the worker that computes its embedding.
    out: list[list[str]] = []
    for group in groups:
        if out and tensors[group[0]].alias_of and tensors[group[0]].alias_of in out[-1]:
            out[-1].append(group[0])
            group = group[1:]
        if group:
            out.append(group)
    return out


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]
