"""Deterministic random numbers for random masks (DARE, DELLA).

A mask must be a pure function of (recipe seed, tensor name, model index): the same entries are dropped no
matter which worker merges the tensor, in which order, on which device. So every mask gets its own CPU
`torch.Generator` seeded from a hash of that triple, the numbers are drawn on CPU (CPU and CUDA generators
produce different streams) and only then moved to the tensor's device. The global RNG is never touched.
"""

from __future__ import annotations

import hashlib

import torch


def mask_seed(seed: int, name: str, index: int) -> int:
    """64-bit seed: the first 8 bytes of sha256(f"{seed}\\0{name}\\0{index}"), little-endian."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def mask_generator(seed: int, name: str, index: int) -> torch.Generator:
    """A fresh CPU generator for the mask of model `index` on tensor `name`."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mask_seed(seed, name, index))
    return generator


def uniform_like(tensor: torch.Tensor, seed: int, name: str, index: int) -> torch.Tensor:
    """Uniform [0, 1) fp32 numbers of `tensor`'s shape, drawn on CPU, placed on `tensor`'s device."""
    generator = mask_generator(seed, name, index)
    values = torch.rand(tensor.shape, generator=generator, dtype=torch.float32, device="cpu")
    return values.to(tensor.device)
