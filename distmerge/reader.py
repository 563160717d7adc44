"""Read a set of tensors by name from any checkpoint URL into torch tensors.

Remote files: the byte ranges of the requested tensors are grouped by file and coalesced into few requests.
Local files: by default tensors are zero-copy views of a read-only mmap (the page cache is the buffer), so
reading costs no copy until a computation needs one; views are read-only, consumers must not write in place.
Mapped pages count in the process's RSS until unmapped: a reader done with a tensor calls `release`, which
keeps a long merge's memory flat (the merge releases each piece once it is done with it). With
`use_mmap=False` local files are read like remote ones (coalesced preads into private buffers).
"""

from __future__ import annotations

import mmap
import warnings
from collections import defaultdict
from collections.abc import Iterable

import torch

from distmerge.checkpoint import CheckpointIndex
from distmerge.safetensors_format import TensorEntry


class TensorReader:
    """Reads tensors of one checkpoint; keeps local files mapped between calls."""

    def __init__(self, index: CheckpointIndex, *, use_mmap: bool = True):
        self.index = index
        self.use_mmap = use_mmap
        self._maps: dict[str, mmap.mmap] = {}

    def read(
        self, names: Iterable[str], *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Tensors by name; `dtype` casts (e.g. torch.float32 to upcast bf16), `device` moves."""
        entries = [self.index.entry(n) for n in names]
        by_file: dict[str, list[TensorEntry]] = defaultdict(list)
        for entry in entries:
            by_file[entry.file].append(entry)
        out: dict[str, torch.Tensor] = {}
        for file, group in by_file.items():
            loc = self.index.location.child(file)
            if self.use_mmap and loc.local_path is not None:
                raw = {e.name: self._mapped(file, loc.local_path, e) for e in group}
            else:
                blobs = loc.read_ranges([(e.start, e.end) for e in group], file_size=self.index.files[file].size)
                raw = {e.name: _from_buffer(blob, e, 0) for e, blob in zip(group, blobs, strict=True)}
            for name, tensor in raw.items():
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                out[name] = tensor.to(device) if str(device) != "cpu" else tensor
        return {e.name: out[e.name] for e in entries}

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (first dimension), reading only their bytes."""
        entry = self.index.entry(name)
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape and entry.shape[0] else 0
        part = TensorEntry(name, entry.file, entry.dtype, (stop - start, *entry.shape[1:]),
                           entry.start + start * row_bytes, entry.start + stop * row_bytes)
        loc = self.index.location.child(entry.file)
        if self.use_mmap and loc.local_path is not None:
            return self._mapped(entry.file, loc.local_path, part)
        (blob,) = loc.read_ranges([(part.start, part.end)], file_size=self.index.files[entry.file].size)
        return _from_buffer(blob, part, 0)

    def release(self, name: str, start: int | None = None, stop: int | None = None) -> None:
        """Unmap the pages of tensor `name` (rows [start, stop) if given) from this process, keeping them in
        the page cache: a reader that is done with a tensor's bytes keeps its memory flat, as private buffers
        freed chunk by chunk would. Views still alive read the same bytes (pages fault back in). Only whole
        pages inside the range; nothing for tensors that were not mapped."""
        entry = self.index.entry(name)
        mm = self._maps.get(entry.file)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        low, high = entry.start, entry.end
        if start is not None and entry.shape and entry.shape[0]:
            row_bytes = entry.nbytes // entry.shape[0]
            low, high = entry.start + start * row_bytes, entry.start + stop * row_bytes
        first, last = -(-low // mmap.PAGESIZE) * mmap.PAGESIZE, high // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            mm.madvise(mmap.MADV_DONTNEED, first, last - first)

    def _mapped(self, file: str, path: str, entry: TensorEntry) -> torch.Tensor:
        mm = self._maps.get(file)
        if mm is None:
            with open(path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[file] = mm
        return _from_buffer(mm, entry, entry.start)

    def close(self) -> None:
        # Tensors may still view the maps; dropping our references lets them close when the last view dies.
        self._maps.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _from_buffer(buffer, entry: TensorEntry, offset: int) -> torch.Tensor:
    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=entry.torch_dtype)
    with warnings.catch_warnings():
        # torch warns that the buffer is not writable: intended, these are read-only views.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buffer, dtype=entry.torch_dtype, count=entry.numel, offset=offset)
    return flat.reshape(entry.shape)


def read_tensors(
    url: str, names: Iterable[str] | None = None, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Convenience: index `url` and read `names` (all tensors when None)."""
    index = CheckpointIndex.load(url)
    with TensorReader(index) as reader:
        return reader.read(index.names if names is None else names, dtype=dtype)
