"""Exact sums of |x| over fp32 tensors, as integer partials; division by a scalar rounded alike on every device.

A float sum depends on the order of its additions: on how a tensor is cut into row chunks and on how many
threads reduce it. Methods whose result must not depend on either (DARE's L1 rescale) sum magnitudes
exactly instead: every finite fp32 value is an integer number of units 2^-149 (the smallest subnormal), so a
sum is an integer. A partial (int64 [PARTIAL_SIZE]) holds it as DIGITS 32-bit digits, least significant
first, then the number of NaN entries and of infinite ones. Partials add exactly, in any order (a digit may
exceed 32 bits after additions: it still counts 2^(32 k) units); `partial_value` turns one into the correctly
rounded float (NaN if any entry was NaN, else infinity if any was infinite). Every way of computing a
partial (torch, the C kernels) returns the same canonical digits, so they compare bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from distmerge.methods import cpu_kernels

NUM_EXPONENTS = 256
DIGITS = 10  # 32-bit digits: sums up to 2^320 units, past 2^40 entries of the largest float
PARTIAL_SIZE = DIGITS + 2  # the digits, then the NaN and infinity counts
assert PARTIAL_SIZE == cpu_kernels.PARTIAL_SIZE, "random_kernels.c writes partials of this size"
_NAN, _INF = DIGITS, DIGITS + 1
# A float64 sum of values of one exponent stays exact below 2^53 units: 2^29 values of < 2^24 units.
_MAX_ELEMENTS_PER_CALL = 1 << 29
# random_kernels.c's bound: its slots grow by under 2^43 per 2048 entries, so 2^26 entries stay far from 2^63.
_MAX_ELEMENTS_PER_KERNEL_CALL = 1 << 26
# 1 / (the unit of biased exponent e) = 2^(150 - max(e, 1)): subnormals (e = 0) share exponent 1's unit.
_UNITS_PER_VALUE = torch.tensor([2.0 ** (150 - max(e, 1)) for e in range(NUM_EXPONENTS)], dtype=torch.float64)


def canonical(units_by_exponent: list[int], nans: int = 0, infinities: int = 0) -> torch.Tensor:
    """The partial of a sum given as integer units 2^(max(e, 1) - 150) per biased exponent e, plus the NaN and
    infinity counts (random_kernels.c's canonical_partial computes the same digits)."""
    total = sum(units << (max(e, 1) - 1) for e, units in enumerate(units_by_exponent) if units)
    digits = [(total >> (32 * k)) & 0xFFFFFFFF for k in range(DIGITS - 1)] + [total >> (32 * (DIGITS - 1))]
    return torch.tensor([*digits, nans, infinities], dtype=torch.int64)


def abs_sum_partial(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The partial of sum |x| (int64 [PARTIAL_SIZE], on CPU); with a bool `keep` shaped like x, the partials
    of all entries and of the kept ones (int64 [2, PARTIAL_SIZE]).

    Within one exponent every finite |x| is an integer number (< 2^24) of units, so a float64 sum of up to
    2^29 of them is exact whatever the order: bincount sums each exponent's values, then they become integers.
    """
    magnitudes = x.detach().abs().flatten()
    slot = magnitudes.view(torch.int32) >> 23
    # Non-finite entries are only counted: their exponent slot (255) gets weight 0.
    weights = torch.where(magnitudes < math.inf, magnitudes, 0.0).double()
    whole = _partial(magnitudes, slot, weights, None)
    if keep is None:
        return whole
    kept = keep.flatten()
    return torch.stack([whole, _partial(magnitudes, slot, weights.mul(kept), kept)])


def _partial(magnitudes: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor,
             selected: torch.Tensor | None) -> torch.Tensor:
    """The partial of the entries `selected` (all when None), `weights` being their |x| (0 where not finite)."""
    units = torch.zeros(NUM_EXPONENTS, dtype=torch.int64)
    for start in range(0, magnitudes.numel(), _MAX_ELEMENTS_PER_CALL):
        part = slice(start, start + _MAX_ELEMENTS_PER_CALL)
        sums = torch.bincount(slot[part], weights=weights[part], minlength=NUM_EXPONENTS)
        units += (sums.cpu() * _UNITS_PER_VALUE).to(torch.int64)
    nans, infinities = magnitudes.isnan(), magnitudes == math.inf
    if selected is not None:
        nans, infinities = nans & selected, infinities & selected
    return canonical(units.tolist(), int(nans.sum()), int(infinities.sum()))


def dare_abs_partial(x: torch.Tensor, key: int, position: int, density: float,
                     base: torch.Tensor | None = None) -> torch.Tensor:
    """`abs_sum_partial(x, uniform < density)` with uniform = numbers [position, position + x.numel()) of
    the random stream `key` (rng.py), by the C kernel: the numbers never stored (needs cpu_kernels.enabled).
    With `base`, x and base are bf16 inputs (`Bf16Sources`) and the task vector x - base is formed as read."""
    flat = x.reshape(-1)
    flat_base = None if base is None else base.reshape(-1)
    total = torch.zeros(2, PARTIAL_SIZE, dtype=torch.int64)
    for start in range(0, flat.numel(), _MAX_ELEMENTS_PER_KERNEL_CALL):
        stop = start + _MAX_ELEMENTS_PER_KERNEL_CALL
        total += cpu_kernels.dare_abs_partials(flat[start:stop], key, position + start, density,
                                               None if flat_base is None else flat_base[start:stop])
    return total


def partial_value(partial: torch.Tensor) -> float:
    """The exact sum a partial stands for, rounded once to the nearest float."""
    values = partial.tolist()
    if values[_NAN]:
        return math.nan
    if values[_INF]:
        return math.inf
    scaled = sum(digit << (32 * k) for k, digit in enumerate(values[:DIGITS]))  # units of 2^-149
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
