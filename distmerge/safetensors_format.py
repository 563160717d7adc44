"""The safetensors file format: parse and validate headers, serialise shards as a stream.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data section.
Offsets are relative to the data section. Everything here works from header bytes alone, so planning
needs only two small ranged reads per file. Validation is strict: a corrupted or hostile header must fail
with a message naming the file and tensor, never produce a wrong tensor.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

import torch

from distmerge.checksum import checksum_text, new_hasher
from distmerge.errors import CheckpointError

# Headers of real checkpoints are well under 10 MiB; a larger length means corruption, not a model.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def dtype_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file name (relative to the checkpoint), dtype, shape, absolute byte range."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class FileHeader:
    file: str
    size: int
    data_start: int
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def read_header_length(prefix: bytes, file: str, file_size: int) -> int:
    if file_size < 8 or len(prefix) < 8:
        raise CheckpointError(
            f"truncated: {file_size} bytes, shorter than the 8-byte header length", file=file,
            fix="re-download or re-save the file",
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > min(MAX_HEADER_BYTES, file_size - 8):
        raise CheckpointError(
            f"header length {length} runs past the end of the file ({file_size} bytes)", file=file,
            fix="the file is truncated or not safetensors; re-download or re-save it",
        )
    return length


def parse_header(header_bytes: bytes, file: str, file_size: int) -> FileHeader:
    """Validate a header and return absolute byte ranges for every tensor."""
    data_start = 8 + len(header_bytes)
    try:
        raw = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_reject_duplicates(file))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"invalid header JSON ({exc})", file=file, fix="re-save the file") from None
    if not isinstance(raw, dict):
        raise CheckpointError("header JSON is not an object", file=file, fix="re-save the file")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("__metadata__ must map strings to strings", file=file, fix="re-save the file")
    data_size = file_size - data_start
    tensors = {name: _parse_entry(name, spec, file, data_start, data_size) for name, spec in raw.items()}
    _check_no_overlap(tensors.values(), file)
    return FileHeader(file, file_size, data_start, dict(metadata), tensors)


def _reject_duplicates(file: str):
    """json hook: plain json.loads keeps the last of duplicate names silently; a header must not."""

    def hook(pairs: list[tuple[str, object]]) -> dict:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise CheckpointError("duplicate tensor name in header", file=file, tensor=key,
                                      fix="re-save the file with unique tensor names")
            seen.add(key)
        return dict(pairs)

    return hook


def _parse_entry(name: str, spec: object, file: str, data_start: int, data_size: int) -> TensorEntry:
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise CheckpointError("entry lacks dtype, shape or data_offsets", file=file, tensor=name,
                              fix="re-save the file")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})", file=file, tensor=name,
                              fix="convert the tensor to a supported dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"invalid shape {shape!r}", file=file, tensor=name, fix="re-save the file")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"invalid data_offsets {offsets!r}", file=file, tensor=name, fix="re-save the file")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(
            f"data_offsets [{begin}, {end}] fall outside the data section ({data_size} bytes)",
            file=file, tensor=name, fix="the file is truncated or corrupt; re-download or re-save it",
        )
    expected = math.prod(shape) * dtype_size(dtype)
    if end - begin != expected:
        raise CheckpointError(
            f"shape {shape} x {dtype} needs {expected} bytes but data_offsets span {end - begin}",
            file=file, tensor=name, fix="the header is corrupt; re-save the file",
        )
    return TensorEntry(name, file, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_no_overlap(entries: Iterable[TensorEntry], file: str) -> None:
    previous: TensorEntry | None = None
    for entry in sorted(entries, key=lambda e: (e.start, e.end)):
        if previous is not None and entry.start < previous.end and entry.nbytes and previous.nbytes:
            raise CheckpointError(
                f"byte range overlaps tensor {previous.name!r}", file=file, tensor=entry.name,
                fix="the header is corrupt; re-save the file",
            )
        previous = entry


# -- writing ----------------------------------------------------------------------------------------------

def build_header(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """Header bytes (length prefix included) for tensors laid out contiguously in the given order."""
    spec: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        spec[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(spec, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)  # data section starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(body)) + body


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy where possible."""
    t = tensor.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


class ShardStream:
    """Write a safetensors file tensor by tensor: the header comes first (from the planned specs), so a
    shard never has to sit in memory whole. Its checksum (`distmerge.checksum`) is computed on the fly."""

    def __init__(self, stream: BinaryIO, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self._stream = stream
        self._specs = list(specs)
        self._next = 0
        self._current = 0  # bytes of the current tensor written so far
        header = build_header(self._specs, metadata or {"format": "pt"})
        self._digest = new_hasher()
        self._digest.update(header)
        stream.write(header)
        self.size = len(header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._specs[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != expected:
            raise AssertionError(f"shard stream expected {expected}, got {(name, tensor.dtype, tuple(tensor.shape))}")
        self.write_part(name, tensor)

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """Append the next piece (e.g. a chunk of rows) of tensor `name`; the tensor ends when its bytes do."""
        spec_name, dtype, shape = self._specs[self._next]
        if name != spec_name or part.dtype != dtype:
            raise AssertionError(f"shard stream expected {spec_name} ({dtype}), got {name} ({part.dtype})")
        data = tensor_bytes(part)
        self._digest.update(data)
        self._stream.write(data)
        self.size += len(data)
        self._current += len(data)
        expected = math.prod(shape) * part.element_size()
        if self._current > expected:
            raise AssertionError(f"{name}: {self._current} bytes written, the header says {expected}")
        if self._current == expected:
            self._next += 1
            self._current = 0

    def finish(self) -> tuple[int, str]:
        if self._next != len(self._specs):
            raise AssertionError(f"shard stream closed after {self._next} of {len(self._specs)} tensors")
        return self.size, checksum_text(self._digest)


def write_safetensors(
    stream: BinaryIO, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> tuple[int, str]:
    """Stream a safetensors file; returns (bytes written, "<algorithm>:<hex>" checksum) computed on the fly."""
    shard = ShardStream(stream, [(n, t.dtype, tuple(t.shape)) for n, t in tensors], metadata)
    for name, tensor in tensors:
        shard.write(name, tensor)
    return shard.finish()
