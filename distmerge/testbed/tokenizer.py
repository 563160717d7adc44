"""Character-level tokenizer for the testbed family, built locally with the `tokenizers` library.

Key decisions:
- A fixed alphabet (specials, digits, letters, the task punctuation) rather than one learned from a corpus:
  ids never depend on which tasks or seeds a family uses, so every checkpoint of every family shares one
  vocabulary and their tensors line up for merging.
- Qwen2's own tokenizer pipeline with an empty merge list: NFC normaliser, Qwen2's split regex, byte-level
  pre-tokenizer and decoder, and a BPE model whose vocabulary is the byte-level form of each character
  (space is "Ġ", newline "Ċ") and which has no merges, so every character is exactly one token.
  Why not a plain WordLevel model: transformers 5 loads any checkpoint whose config says `qwen2` with
  `Qwen2Tokenizer`, which keeps tokenizer.json's vocabulary and merges but imposes exactly this pipeline
  (a WordLevel tokenizer silently lost spaces and newlines that way). Built like this, tokenizer.json
  encodes identically under the `tokenizers` library, transformers 4 and 5, and vLLM.
- The post-processor prepends `<bos>`; training sequences are built with the same tokenizer, so a prompt
  tokenized by transformers or vLLM starts exactly as it did in training.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
ALPHABET = "\n " + string.digits + string.ascii_lowercase + string.ascii_uppercase + ":+=-"
# Qwen2's pre-tokenization regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_BYTE_LEVEL = {" ": "Ġ", "\n": "Ċ"}  # the byte-level alphabet's names for the two non-printing characters


def vocabulary() -> dict[str, int]:
    """Token -> id: the specials first (pad=0, bos=1, eos=2, unk=3), then the alphabet in a fixed order."""
    tokens = (*SPECIAL_TOKENS, *(_BYTE_LEVEL.get(char, char) for char in ALPHABET))
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The testbed tokenizer, ready to encode, decode and `save_pretrained`."""
    vocab = vocabulary()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=64,
    )


def save_tokenizer(folder: str | Path) -> None:
    """Write tokenizer.json and tokenizer_config.json into `folder`."""
    build_tokenizer().save_pretrained(str(folder))
    # transformers 5 records its own class name (TokenizersBackend), unknown to transformers 4; the
    # portable name loads the same tokenizer.json on both (vLLM builds may pin either).
    config_path = Path(folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
