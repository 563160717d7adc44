"""Exact sums of |x| over fp32 tensors, as integer partials; division by a scalar rounded alike on every device.

A float sum depends on the order of its additions: on how a tensor is cut into row chunks and on how many
threads reduce it. Methods whose result must not depend on either (DARE's L1 rescale) sum magnitudes
exactly instead: every fp32 value is an integer number of units 2^(exponent - 150), so a partial holds, per
biased exponent, the integer sum of the units (`abs_sum_partial`, int64 [256]: 2^39 entries of < 2^24 units
fit). Partials add exactly, in any order; `partial_value` turns one into the correctly rounded float.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from distmerge.methods import cpu_kernels

NUM_EXPONENTS = 256
# A float64 sum of values of one exponent stays exact below 2^53 units: 2^29 values of < 2^24 units.
_MAX_ELEMENTS_PER_CALL = 1 << 29
# 1 / (the unit of biased exponent e) = 2^(150 - max(e, 1)): subnormals (e = 0) share exponent 1's unit.
_UNITS_PER_VALUE = torch.tensor([2.0 ** (150 - max(e, 1)) for e in range(NUM_EXPONENTS)], dtype=torch.float64)


def abs_sum_partial(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per biased exponent, the sum of |x| in units of that exponent (int64 [256], on CPU); with a bool `keep`
    shaped like x, the partials of all entries and of the kept ones (int64 [2, 256]).

    Within one exponent every |x| is an integer number (< 2^24) of units, so a float64 sum of up to 2^29 of
    them is exact whatever the order: bincount sums each exponent's values, then they become integers.
    """
    magnitudes = x.detach().abs().flatten()
    slot = magnitudes.view(torch.int32) >> 23
    buckets = 1
    if keep is not None:
        slot = slot.add_(keep.flatten(), alpha=NUM_EXPONENTS)
        buckets = 2
    return _partials(magnitudes.numel(), buckets, lambda part: torch.bincount(
        slot[part], weights=magnitudes[part].double(), minlength=buckets * NUM_EXPONENTS))


def abs_sum_partial_below(x: torch.Tensor, uniform: torch.Tensor, density: float) -> torch.Tensor:
    """`abs_sum_partial(x, uniform < density)`, fused on CPU (`cpu_kernels`): the same integers."""
    if not cpu_kernels.enabled(x, uniform):
        return abs_sum_partial(x, uniform < density)
    flat_x, flat_u = x.reshape(-1), uniform.reshape(-1)
    return _partials(flat_x.numel(), 2,
                     lambda part: cpu_kernels.abs_sums_by_exponent(flat_x[part], flat_u[part], density))


def _partials(numel: int, buckets: int, part_sums) -> torch.Tensor:
    """Integer partials from float64 sums per (bucket, exponent) of slices of at most _MAX_ELEMENTS_PER_CALL
    entries (each exact); with two buckets (not kept, kept) the result is [all, kept]."""
    units = torch.zeros(buckets, NUM_EXPONENTS, dtype=torch.int64)
    for start in range(0, numel, _MAX_ELEMENTS_PER_CALL):
        sums = part_sums(slice(start, start + _MAX_ELEMENTS_PER_CALL))
        units += (sums.cpu().view(buckets, NUM_EXPONENTS) * _UNITS_PER_VALUE).to(torch.int64)
    return units[0] if buckets == 1 else torch.stack([units[0] + units[1], units[1]])


def partial_value(partial: torch.Tensor) -> float:
    """The exact sum a partial stands for, rounded once to the nearest float."""
    scaled = sum(int(s) << (max(e, 1) - 1) for e, s in enumerate(partial.tolist()) if s)  # units of 2^-149
    return math.ldexp(float(scaled), -149)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run float reductions that have no exact form here (cosines, LiNeS norms) on one intra-op thread: torch
    splits a reduction by thread, so its rounding would otherwise depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def divide_(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x /= divisor in place, correctly rounded on every device. CUDA turns division by a Python number into
    multiplication by its rounded reciprocal (two roundings, so a different last bit than the CPU's division
    for divisors like 3 or 0.3); a divisor tensor on x's device gets a true division there too."""
    if x.device.type == "cpu":
        return x.div_(divisor)
    return x.div_(torch.tensor(divisor, dtype=x.dtype, device=x.device))
