"""Deterministic random numbers for random masks (DARE, DELLA).

A mask must be a pure function of (recipe seed, tensor name, model index): the same entries are dropped no
matter which worker merges the tensor, in which order, on which device, and whether the tensor is merged
whole or in row chunks (large tensors are, to bound memory). So the flattened tensor is cut into fixed
segments of SEGMENT elements; segment s gets its own generator seeded from a hash of (seed, name, index, s).
The generator is numpy's PCG64, about four times faster than torch's CPU generator (DARE and DELLA draw as
many numbers as the model has parameters, per model), and it can jump ahead: a chunk that needs elements
[a, b) of a segment draws exactly those (each 64-bit step gives two float32 numbers of 24 random bits).
The numbers are drawn on CPU and only then moved to the tensor's device; no global RNG is touched.

An executor that makes several passes over one tensor (DARE's L1 statistics pass, then the merge) can draw
each chunk's numbers once: inside `reusing_draws(name)` a repeated draw of that tensor returns the tensor drawn before.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator

import numpy as np
import torch

from distmerge.methods import cpu_kernels

SEGMENT = 1 << 22  # elements per independently seeded segment

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


def mask_seed(seed: int, name: str, index: int, segment: int = 0) -> int:
    """64-bit seed: the first 8 bytes of sha256(f"{seed}\\0{name}\\0{index}"), plus f"\\0{segment}" after the
    first segment, little-endian."""
    text = f"{seed}\0{name}\0{index}" + (f"\0{segment}" if segment else "")
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def segment_uniform(seed: int, name: str, index: int, segment: int, start: int, stop: int) -> torch.Tensor:
    """Numbers [start, stop) of one segment's stream of uniform [0, 1) fp32 numbers.

    The stream is numpy's `Generator(PCG64).random(dtype=float32)`: each number is the next 32 random bits
    (the low half of a 64-bit step, then the high half) shifted right by 8, times 2^-24. Built here from the raw
    64-bit steps, which gives the same numbers at less than half the cost; the C kernels draw those steps
    themselves from the generator's state (four interleaved LCG chains, ~1.8x numpy's `random_raw`).
    """
    bit_generator = np.random.PCG64(mask_seed(seed, name, index, segment))
    bit_generator.advance(start // 2)  # two numbers per step: land on the step holding number `start`
    count = stop - start + start % 2
    raw = cpu_kernels.pcg64_raw(bit_generator, (count + 1) // 2)
    if raw is None:
        raw = bit_generator.random_raw((count + 1) // 2).astype("<u8", copy=False)
    fused = cpu_kernels.uniform_in_place(raw, start % 2, stop - start)
    if fused is not None:
        return torch.from_numpy(fused)
    words = raw.view("<u4")[:count]
    np.right_shift(words, 8, out=words)
    # In place (same item size, element by element): the stream costs 4 bytes per number, not 12.
    values = raw.view(np.float32)[:count]
    np.multiply(words, np.float32(2.0**-24), out=values, casting="unsafe")
    return torch.from_numpy(values[start % 2:])


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
    numel = tensor.numel()
    first, last = offset // SEGMENT, (offset + numel - 1) // SEGMENT if numel else offset // SEGMENT
    pieces = []
    for segment in range(first, last + 1):
        start = max(offset, segment * SEGMENT) - segment * SEGMENT
        stop = min(offset + numel, (segment + 1) * SEGMENT) - segment * SEGMENT
        pieces.append(segment_uniform(seed, name, index, segment, start, stop))
    flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    drawn = flat.reshape(tensor.shape).to(tensor.device)
    if draws is not None:
        draws[key] = drawn
    return drawn
