"""Deterministic random numbers for random masks (DARE, DELLA).

A mask must be a pure function of (recipe seed, tensor name, model index): the same entries are dropped no
matter which worker merges the tensor, in which order, on which device, and whether the tensor is merged
whole or in row chunks (large tensors are, to bound memory). So the numbers are counter-based: the stream of
(seed, name, index) has a 64-bit key (`mask_key`), and number j of the flattened tensor is a pure function of
(key, j), as SplitMix64 computes its outputs:

    word  = mix(key + (j // 2 + 1) * GAMMA mod 2^64)          (SplitMix64's output function)
    bits  = low 32 bits of word for even j, high 32 bits for odd j
    u_j   = (bits >> 8) * 2^-24                                 (uniform in [0, 1), 24 random bits, as float32)

A chunk draws exactly its own numbers, with no state to jump over, and the C kernels (`random_kernels.c`)
compute them in vectorized loops, in the same loop as the drop that reads them (DARE never stores them).
Here they are built with numpy when the kernels are off; they are drawn on CPU and only then moved to the
tensor's device; no global RNG is touched.

An executor that makes several passes over one tensor on the torch path (DARE's L1 statistics pass, then the
merge) can draw each chunk's numbers once: inside `reusing_draws(name)` a repeated draw of that tensor
returns the tensor drawn before.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator

import numpy as np
import torch

from distmerge.methods import cpu_kernels

# Names the construction below; provenance records it, so a published DARE/DELLA merge says which masks it got
# (the same recipe gives the same bytes under the same stream). Change it with the construction.
STREAM = "splitmix64-halves-24bit/1"
GAMMA = 0x9E3779B97F4A7C15
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)

_scope = threading.local()  # .draws: (tensor name, its reusable draws) on this thread, or absent/None


@contextlib.contextmanager
def reusing_draws(name: str) -> Iterator[None]:
    """On this thread, until the scope ends, `uniform_like` returns the tensor it returned before for the same
    (seed, name, index, offset, shape, device) of tensor `name` instead of drawing it again. The numbers are
    the same either way (they are a pure function of those); only the work differs. Holds the tensor's draws
    until the scope ends: use it around passes over a tensor whose inputs are held anyway. Callers must not
    modify draws in place.

    Only `name`'s draws are kept: should the scope never end on this thread (a generator holding it closed on
    another), it holds at most that one tensor's numbers, however long the thread lives.
    """
    previous, mine = getattr(_scope, "draws", None), (name, {})
    _scope.draws = mine
    try:
        yield
    finally:
        if getattr(_scope, "draws", None) is mine:  # a generator closed on another thread leaves this one alone
            _scope.draws = previous


def mask_key(seed: int, name: str, index: int) -> int:
    """The 64-bit key of the stream of (seed, tensor name, model index): the first 8 bytes of
    sha256(f"{seed}\\0{name}\\0{index}"), little-endian."""
    text = f"{seed}\0{name}\0{index}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def stream_numbers(key: int, position: int, count: int) -> torch.Tensor:
    """Numbers [position, position + count) of stream `key` (fp32, CPU), by the kernels when they are on."""
    if count and cpu_kernels.enabled():
        return cpu_kernels.uniform_fill(key, position, count)
    return torch.from_numpy(_numpy_numbers(key, position, count))


def _numpy_numbers(key: int, position: int, count: int) -> np.ndarray:
    """The module docstring's construction in numpy uint64 arithmetic (wrapping mod 2^64)."""
    first = position // 2
    steps = (position + count + 1) // 2 - first
    with np.errstate(over="ignore"):
        z = np.uint64(key) + (np.arange(first + 1, first + steps + 1, dtype=np.uint64) * np.uint64(GAMMA))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX[0])
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX[1])
    z ^= z >> np.uint64(31)
    words = z.astype("<u8", copy=False).view("<u4")[position % 2:position % 2 + count]
    return (words >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def uniform_like(tensor: torch.Tensor, seed: int, name: str, index: int, *, offset: int = 0) -> torch.Tensor:
    """Uniform [0, 1) fp32 numbers of `tensor`'s shape, drawn on CPU, placed on `tensor`'s device.

    `tensor` may be a chunk: elements [offset, offset + numel) of a larger tensor. The numbers depend only on
    the element's position in the whole tensor.
    """
    scope = getattr(_scope, "draws", None)
    draws = scope[1] if scope is not None and scope[0] == name else None
    key = (seed, index, offset, tuple(tensor.shape), str(tensor.device))
    if draws is not None and key in draws:
        return draws[key]
    flat = stream_numbers(mask_key(seed, name, index), offset, tensor.numel())
    drawn = flat.reshape(tensor.shape).to(tensor.device)
    if draws is not None:
        draws[key] = drawn
    return drawn
