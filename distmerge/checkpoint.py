"""Index a Hugging Face safetensors checkpoint from its headers only.

`CheckpointIndex.load(url)` lists the checkpoint prefix once, reads `config.json` and
`model.safetensors.index.json` when present, and two small ranges per shard (length prefix, header).
It never reads tensor data, so indexing a 70B checkpoint on S3 costs a few hundred KiB of transfer.
Pickle weights (`*.bin`, `*.pt`) are refused: loading a pickle runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from distmerge import architecture
from distmerge.errors import CheckpointError
from distmerge.safetensors_format import FileHeader, TensorEntry, parse_header, read_header_length
from distmerge.storage import Location, location

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a merged checkpoint needs beside its weights, copied from a chosen source checkpoint.
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
)
HEADER_READ_THREADS = 8


@dataclass
class CheckpointIndex:
    """Tensor name -> (file, dtype, shape, byte range) for one checkpoint, plus its config."""

    location: Location
    files: dict[str, FileHeader]
    tensors: dict[str, TensorEntry]
    config: dict[str, Any] | None
    listing: dict[str, dict[str, Any]] = field(repr=False, default_factory=dict)

    @classmethod
    def load(cls, url: str | Location, options: Mapping[str, Any] | None = None) -> CheckpointIndex:
        loc = location(url, options)
        if loc.url.endswith(".safetensors"):
            root, weight_files = loc.parent, [loc.name]
            listing = root.list()
            if loc.name not in listing:
                raise CheckpointError("not found", file=loc.url, fix="check the URL")
            weight_map = None
        else:
            root = loc
            listing = root.list()
            weight_files, weight_map = _weight_files(root, listing)
        config = _read_json(root, CONFIG_NAME) if CONFIG_NAME in listing else None
        with ThreadPoolExecutor(min(HEADER_READ_THREADS, len(weight_files))) as pool:
            headers = list(pool.map(lambda f: read_file_header(root.child(f), int(listing[f]["size"])), weight_files))
        files = {h.file: h for h in headers}
        tensors = _merge_headers(root, headers, weight_map)
        return cls(root, files, tensors, config, listing)

    # -- facts ----------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.location.url

    @cached_property
    def names(self) -> list[str]:
        return list(self.tensors)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @cached_property
    def num_layers(self) -> int:
        return architecture.num_hidden_layers(self.config, self.names)

    @property
    def tied_embeddings(self) -> bool:
        return architecture.tied_embeddings(self.config)

    @property
    def architecture(self) -> str:
        archs = (self.config or {}).get("architectures") or []
        return archs[0] if archs else (self.config or {}).get("model_type", "unknown")

    def layer_of(self, name: str) -> int | None:
        return architecture.layer_index(name)

    def kind_of(self, name: str) -> str:
        return architecture.tensor_kind(name)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError("no such tensor", file=self.url, tensor=name,
                                  fix="check the name with `distmerge inspect`") from None

    def dtype_counts(self) -> dict[str, int]:
        """Parameters per dtype."""
        counts: Counter[str] = Counter()
        for t in self.tensors.values():
            counts[t.dtype] += t.numel
        return dict(counts)

    def fingerprint(self) -> str:
        """Content identity from headers, sizes and (when the store reports them) ETags; no data read."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            info = self.listing.get(name, {})
            etag = info.get("ETag") or info.get("etag") or ""
            digest.update(f"{name}\0{self.files[name].size}\0{etag}\0".encode())
        for name, t in sorted(self.tensors.items()):
            digest.update(f"{name}\0{t.dtype}\0{t.shape}\0{t.file}\0{t.start}\0{t.end}\0".encode())
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        layers = sorted({i for i in (self.layer_of(n) for n in self.names) if i is not None})
        special = {kind: [n for n in self.names if self.kind_of(n) == kind] for kind in ("embedding", "lm_head")}
        special["final_norm"] = [n for n in self.names if n in architecture.FINAL_NORM_NAMES]
        return {
            "url": self.url,
            "architecture": self.architecture,
            "num_parameters": self.num_parameters,
            "num_tensors": len(self.tensors),
            "num_layers": self.num_layers,
            "layers_found": len(layers),
            "dtypes": self.dtype_counts(),
            "shards": {f: {"size": h.size, "num_tensors": len(h.tensors)} for f, h in self.files.items()},
            "total_bytes": self.total_bytes,
            "tied_embeddings": self.tied_embeddings,
            "embeddings": special["embedding"],
            "lm_head": special["lm_head"],
            "final_norm": special["final_norm"],
        }


def read_file_header(loc: Location, file_size: int) -> FileHeader:
    """Two small ranged reads: the 8-byte length, then the JSON header."""
    prefix = loc.read_range(0, min(8, file_size), file_size=file_size)
    length = read_header_length(prefix, loc.name, file_size)
    header = loc.read_range(8, 8 + length, file_size=file_size)
    return parse_header(header, loc.name, file_size)


def _weight_files(root: Location, listing: dict[str, dict]) -> tuple[list[str], dict[str, str] | None]:
    if INDEX_NAME in listing:
        index = _read_json(root, INDEX_NAME)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError("has no weight_map", file=f"{root.url}/{INDEX_NAME}",
                                  fix="regenerate the index (e.g. save_pretrained)")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if f not in listing]
        if missing:
            example = next(t for t, f in weight_map.items() if f == missing[0])
            raise CheckpointError(
                f"index points at missing file(s) {missing}", file=f"{root.url}/{INDEX_NAME}", tensor=example,
                fix="upload the missing shards or regenerate the index",
            )
        return files, weight_map
    if SINGLE_NAME in listing:
        return [SINGLE_NAME], None
    shards = sorted(n for n in listing if n.endswith(".safetensors"))
    if shards:
        return shards, None
    pickles = sorted(n for n in listing if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"only pickle weights found ({', '.join(pickles[:3])}); refused because loading a pickle runs "
            "arbitrary code", file=root.url,
            fix="convert to safetensors first (e.g. load in a sandbox and save_pretrained(safe_serialization=True))",
        )
    raise CheckpointError("no safetensors weights found", file=root.url,
                          fix="point at a folder with model.safetensors or model.safetensors.index.json")


def _merge_headers(root: Location, headers: list[FileHeader], weight_map: dict[str, str] | None) -> dict:
    tensors: dict[str, TensorEntry] = {}
    for header in headers:
        for name, entry in header.tensors.items():
            if name in tensors:
                raise CheckpointError(f"tensor also stored in {tensors[name].file}", file=header.file,
                                      tensor=name, fix="remove the duplicate or regenerate the shards")
            tensors[name] = entry
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in tensors or tensors[name].file != file:
                raise CheckpointError(
                    f"index says this tensor is in {file}, but that file's header lacks it",
                    file=f"{root.url}/{INDEX_NAME}", tensor=name, fix="regenerate the index from the shards",
                )
        extra = [n for n in tensors if n not in weight_map]
        if extra:
            raise CheckpointError(f"stored in {tensors[extra[0]].file} but absent from the index",
                                  file=f"{root.url}/{INDEX_NAME}", tensor=extra[0],
                                  fix="regenerate the index from the shards")
    return tensors


def _read_json(root: Location, name: str) -> Any:
    try:
        return json.loads(root.child(name).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"invalid JSON ({exc})", file=f"{root.url}/{name}", fix="re-save the file") from None
