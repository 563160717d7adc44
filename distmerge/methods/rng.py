"""Deterministic random numbers for random masks (DARE, DELLA).

A mask must be a pure function of (recipe seed, tensor name, model index): the same entries are dropped no
matter which worker merges the tensor, in which order, on which device, and whether the tensor is merged
whole or in row chunks (large tensors are, to bound memory). So the flattened tensor is cut into fixed
segments of SEGMENT elements; segment s gets its own CPU `torch.Generator` seeded from a hash of
(seed, name, index, s) and always draws the segment's full length, whatever part of it a chunk needs. The
numbers are drawn on CPU (CPU and CUDA generators produce different streams) and only then moved to the
tensor's device. The global RNG is never touched.
"""

from __future__ import annotations

import hashlib

import torch

SEGMENT = 1 << 22  # elements per independently seeded segment (16 MiB of fp32)


def mask_seed(seed: int, name: str, index: int, segment: int = 0) -> int:
    """64-bit seed: the first 8 bytes of sha256(f"{seed}\\0{name}\\0{index}"), plus f"\\0{segment}" after the
    first segment, little-endian."""
    text = f"{seed}\0{name}\0{index}" + (f"\0{segment}" if segment else "")
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def mask_generator(seed: int, name: str, index: int, segment: int = 0) -> torch.Generator:
    """A fresh CPU generator for segment `segment` of the mask of model `index` on tensor `name`."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mask_seed(seed, name, index, segment))
    return generator


def uniform_like(tensor: torch.Tensor, seed: int, name: str, index: int, *, offset: int = 0,
                 total: int | None = None) -> torch.Tensor:
    """Uniform [0, 1) fp32 numbers of `tensor`'s shape, drawn on CPU, placed on `tensor`'s device.

    `tensor` may be a chunk: elements [offset, offset + numel) of a tensor of `total` elements (default: the
    chunk is the whole tensor). The numbers depend only on the element's position in the whole tensor.
    """
    numel = tensor.numel()
    total = numel if total is None else total
    first, last = offset // SEGMENT, (offset + numel - 1) // SEGMENT if numel else offset // SEGMENT
    pieces = []
    for segment in range(first, last + 1):
        length = min(SEGMENT, total - segment * SEGMENT)
        values = torch.rand(length, generator=mask_generator(seed, name, index, segment), dtype=torch.float32)
        start = max(offset, segment * SEGMENT) - segment * SEGMENT
        stop = min(offset + numel, (segment + 1) * SEGMENT) - segment * SEGMENT
        pieces.append(values[start:stop])
    flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    return flat.reshape(tensor.shape).to(tensor.device)
