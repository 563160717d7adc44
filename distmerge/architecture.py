"""Architecture knowledge as data: which transformer block a tensor belongs to, and what kind it is.

Llama, Qwen2, Mistral, Gemma and most decoder-only families name tensors `model.layers.{i}.<module>`;
a few use `transformer.h.{i}` or `gpt_neox.layers.{i}`. LiNeS needs the block index of each tensor and
the block count; statistics group tensors by kind (attention, MLP, norms, embeddings). Adding a family
means adding patterns here, not code elsewhere.
"""

from __future__ import annotations

import re
from typing import Any

LAYER_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.",
        r"^transformer\.h\.(\d+)\.",
        r"^gpt_neox\.layers\.(\d+)\.",
        r"^model\.decoder\.layers\.(\d+)\.",
    )
)

EMBEDDING_NAMES = frozenset({
    "model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight",
    "gpt_neox.embed_in.weight", "model.language_model.embed_tokens.weight",
})
FINAL_NORM_NAMES = frozenset({
    "model.norm.weight", "model.norm.bias", "norm.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
    "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "model.language_model.norm.weight",
})
LM_HEAD_NAMES = frozenset({"lm_head.weight", "embed_out.weight"})

# Kind of a tensor inside a block, by the first matching substring.
BLOCK_KIND_MARKERS: tuple[tuple[str, str], ...] = (
    ("norm", "norm"),
    ("ln_", "norm"),
    ("self_attn", "attention"),
    ("attention", "attention"),
    ("attn", "attention"),
    ("mlp", "mlp"),
    ("feed_forward", "mlp"),
)

TENSOR_KINDS = ("embedding", "attention", "mlp", "norm", "lm_head", "other")


def layer_index(name: str) -> int | None:
    """Transformer block index of a tensor (0-based), or None for tensors outside the blocks."""
    for pattern in LAYER_PATTERNS:
        match = pattern.match(name)
        if match:
            return int(match.group(1))
    return None


def tensor_kind(name: str) -> str:
    """One of TENSOR_KINDS."""
    if name in EMBEDDING_NAMES or name.endswith("embed_tokens.weight"):
        return "embedding"
    if name in LM_HEAD_NAMES:
        return "lm_head"
    if name in FINAL_NORM_NAMES:
        return "norm"
    lowered = name.lower()
    for marker, kind in BLOCK_KIND_MARKERS:
        if marker in lowered:
            return kind
    return "other"


def num_hidden_layers(config: dict[str, Any] | None, names: list[str]) -> int:
    """Block count: from the config when it says, else one more than the highest block index seen."""
    for source in (config or {}, (config or {}).get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(source.get(key), int):
                return int(source[key])
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(indices) + 1 if indices else 0


def tied_embeddings(config: dict[str, Any] | None) -> bool:
    """Whether lm_head shares the input embedding. transformers defaults tie_word_embeddings to True."""
    if not config:
        return False
    text = config.get("text_config") or {}
    value = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    return bool(value)


def embedding_name(names: list[str] | set[str]) -> str | None:
    for name in names:
        if tensor_kind(name) == "embedding":
            return name
    return None
