"""Fused CPU kernels for the hot loops of the merge methods, bit for bit equal to the torch path.

A TIES merge in torch ops makes ~30 passes over memory per element (abs, compare, mask to int, select, scale,
add, sign, ...), each allocating a tensor; on CPU the merge is bound by those passes, not by arithmetic. Each
kernel (`kernels.c`, `*_kernels.c`, built by `native`) does one or a few vectorized passes with the same float32
operations in the same order, so its result is the torch path's to the bit (tests/test_cpu_kernels.py compares
them on adversarial inputs: ties, zeros, -0.0, NaN, weights != 1), except the sign of a NaN that an operation
creates (inf - inf), which IEEE leaves open. Kernels over task vectors also take the bf16 inputs as read
(`Bf16Sources`, `KernelTau`) and form each tile of a task vector in registers, with bf16_deltas' bits. The
torch code stays the reference and runs everywhere else: on GPU tensors, without a C compiler, or with
DISTMERGE_KERNELS=torch.

Rules that keep the bits equal: every operand is float32, no fused multiply-adds and no reassociation
(`native.FLAGS`), comparisons against the float32 value of a Python scalar (as torch casts a scalar to the
tensor's dtype), and dropped entries are +0.0 (as `select.keep`). Outputs are allocated by torch; ctypes
releases the GIL during a call, so the block threads of a worker run kernels in parallel.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from distmerge.methods import native
from distmerge.methods.registry import Bf16Sources, MergeInputs

if TYPE_CHECKING:
    from distmerge.methods.sparsify import BandPlan

NUM_BINS = 1 << 16


def _switched_on() -> bool:
    return os.environ.get("DISTMERGE_KERNELS", "native") != "torch" and native.library() is not None


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: library built, not switched off, all CPU contiguous fp32."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               for t in tensors) and _switched_on()


def _lib() -> ctypes.CDLL:
    return native.library()


def _ptr(t: torch.Tensor | np.ndarray) -> int:
    return t.data_ptr() if isinstance(t, torch.Tensor) else t.ctypes.data


def _base(base: torch.Tensor | None) -> int | None:
    return None if base is None else base.data_ptr()


def _pointers(taus: Sequence[torch.Tensor]):
    return (ctypes.c_void_p * len(taus))(*(t.data_ptr() for t in taus))


def _model_args(taus: Sequence[torch.Tensor], weights: Sequence[float]):
    """(pointer array, count, float32 weights, uint8 'weight is 1' flags); the arrays must outlive the call."""
    w = np.asarray(weights, np.float32)
    unit = np.asarray([weight == 1.0 for weight in weights], np.uint8)
    return _pointers(taus), len(taus), w, unit


def task_sources(inputs: MergeInputs) -> list[torch.Tensor] | Bf16Sources | None:
    """The task vectors as the kernels read them: the bf16 inputs as read (`MergeInputs.from_bf16` is built only
    where the kernels take them), or the fp32 task vectors; None where the kernels do not take them."""
    if inputs.bf16 is not None:
        return inputs.bf16
    return inputs.deltas if enabled(*inputs.deltas) else None


@dataclass(frozen=True)
class KernelTau:
    """One task vector as the kernels over a single one read it: `x` itself (fp32), or with `base`, bf16 model
    `x` minus bf16 `base`, formed tile by tile."""

    x: torch.Tensor
    base: torch.Tensor | None = None


def kernel_taus(inputs: MergeInputs) -> list[KernelTau] | None:
    """`task_sources(inputs)` model by model."""
    sources = task_sources(inputs)
    if sources is None:
        return None
    if isinstance(sources, Bf16Sources):
        return [KernelTau(model, sources.base) for model in sources.models]
    return [KernelTau(tau) for tau in sources]


def takes_bf16_delta(x: torch.Tensor, theta0: torch.Tensor) -> bool:
    """Whether `bf16_delta` takes these: a contiguous bf16 CPU `x`, a contiguous fp32 CPU theta0, kernels on."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.is_contiguous() and enabled(theta0)


def bf16_delta(x: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
    """x.to(torch.float32) - theta0 (`takes_bf16_delta`, theta0 shaped like x): one pass instead of a
    widening copy and a subtraction (the same bits: the widening is exact)."""
    out = torch.empty(x.shape, dtype=torch.float32)
    _lib().bf16_delta(_ptr(x), _ptr(theta0), x.numel(), _ptr(out))
    return out


def takes_bf16_deltas(base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
    """Whether `bf16_deltas` takes these: contiguous bf16 CPU tensors of one shape, kernels on."""
    return _switched_on() and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.is_contiguous()
                                  and t.shape == base.shape for t in (base, *models))


def bf16_deltas(base: torch.Tensor, models: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(base.float(), [m.float() - base.float() for m in models]) in one pass (`takes_bf16_deltas`)."""
    theta0 = torch.empty(base.shape, dtype=torch.float32)
    taus = [torch.empty(base.shape, dtype=torch.float32) for _ in models]
    _lib().bf16_deltas(_ptr(base), _pointers(models), len(models), base.numel(), _ptr(theta0), _pointers(taus))
    return theta0, taus


def widen(sources: Bf16Sources) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The fp32 theta_0 and task vectors of bf16 inputs (`MergeInputs.from_bf16`'s `widen`)."""
    return bf16_deltas(sources.base, sources.models)


def takes_bf16_target(target: torch.Tensor) -> bool:
    """Whether `add_to_bf16` takes this target as read: contiguous bf16 on CPU, kernels on."""
    return target.device.type == "cpu" and target.dtype == torch.bfloat16 and target.is_contiguous() and _switched_on()


def add_to_bf16(delta: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(delta + target.float()).to(torch.bfloat16) in one pass, for a contiguous fp32 CPU delta (`enabled`) and
    a target of its shape, contiguous fp32 or bf16 on CPU; neither input is modified."""
    out = torch.empty(delta.shape, dtype=torch.bfloat16)
    add = _lib().add_to_bf16_target if target.dtype == torch.bfloat16 else _lib().add_to_bf16
    add(_ptr(delta), _ptr(target), delta.numel(), _ptr(out))
    return out


def add_high_histogram(tau: torch.Tensor, into: torch.Tensor, base: torch.Tensor | None = None) -> None:
    """into += torch.bincount(magnitude_bits(tau) >> 16, minlength=65536), for a contiguous int64 `into`.
    With a bf16 `base`, `tau` is the bf16 model (`KernelTau`), as in every kernel over one task vector."""
    _lib().high_histogram(_ptr(tau), _base(base), tau.numel(), _ptr(into))


def add_bin_histogram(tau: torch.Tensor, high_bin: int, into: torch.Tensor, base: torch.Tensor | None = None) -> int:
    """into += the histogram of the low 16 bits of the |tau| in `high_bin` (contiguous int64 [65536]); returns
    how many entries lie above that bin (radix._bin_histogram's contract)."""
    return _lib().bin_histogram(_ptr(tau), _base(base), tau.numel(), high_bin, _ptr(into))


def add_bin_histogram_pair(tau: torch.Tensor, bins: tuple[int, int], into: torch.Tensor, above: torch.Tensor,
                           base: torch.Tensor | None = None) -> None:
    """add_bin_histogram for two bins in one pass: into[r] (contiguous int64 [2, 65536]) += the histogram of bin
    r; above[r] (contiguous int64 [2]) += how many entries lie above bin r."""
    _lib().bin_histogram_pair(_ptr(tau), _base(base), tau.numel(), bins[0], bins[1], _ptr(into), _ptr(above))


def keep_at_least(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """keep(|tau| >= threshold, tau)."""
    out = torch.empty_like(tau)
    _lib().keep_at_least(_ptr(tau), tau.numel(), threshold, _ptr(out))
    return out


def keep_band(tau: torch.Tensor, top: float, bottom: float) -> torch.Tensor:
    """keep((|tau| <= top) & (|tau| >= bottom), tau)."""
    out = torch.empty_like(tau)
    _lib().keep_band(_ptr(tau), tau.numel(), top, bottom, _ptr(out))
    return out


def count_equal_magnitudes(tau: torch.Tensor, values: Sequence[float], base: torch.Tensor | None = None) -> torch.Tensor:
    """[(|tau| == v).sum() for v in values] (at most two values), int64."""
    counts = torch.zeros(2, dtype=torch.int64)
    if values:
        padded = [*values, values[0]]
        _lib().count_equal_magnitudes(_ptr(tau), _base(base), tau.numel(), padded[0], padded[1], _ptr(counts))
    return counts[:len(values)]


def drop_equal_outside(out: torch.Tensor, tau: torch.Tensor, value: float, low: int, high: int) -> None:
    """In `out` (shaped like tau), zero the entries with |tau| == value numbered outside [low, high) among
    those, in flat order (what the torch path does with nonzero() positions)."""
    _lib().drop_equal_outside(_ptr(out), _ptr(tau), tau.numel(), value, low, high)


def uniform_fill(key: int, position: int, count: int) -> torch.Tensor:
    """Numbers [position, position + count) of the random stream `key` (rng.py's construction), fp32."""
    out = torch.empty(count, dtype=torch.float32)
    _lib().uniform_fill(key, position, count, _ptr(out))
    return out


PARTIAL_SIZE = 12  # random_kernels.c's canonical partials: 10 digits, the NaN and infinity counts (exact.py)


def dare_abs_partials(tau: torch.Tensor, key: int, position: int, density: float,
                      base: torch.Tensor | None = None) -> torch.Tensor:
    """exact's canonical partials (int64 [2, PARTIAL_SIZE]) of |tau| over all entries and over those whose
    random number (stream `key`, tau's entry i being number position + i) is < density; at most 2^26 entries.
    With a bf16 `base`, `tau` is the bf16 model and the task vector is formed as it is read."""
    partials = torch.empty(2, PARTIAL_SIZE, dtype=torch.int64)
    _lib().dare_abs_partials(_ptr(tau), _base(base), tau.numel(), key, position, density, _ptr(partials))
    return partials


@dataclass(frozen=True)
class DareDrop:
    """DARE's drop as `combine` applies it: entry i of tau_m survives where number position + i of stream
    keys[m] is < density, then is multiplied by factors[m] (or divided, with divide: inverse_p's density)."""

    keys: Sequence[int]
    position: int
    density: float
    factors: Sequence[float]
    divide: bool


@dataclass(frozen=True)
class BandKeep:
    """The breadcrumbs band as `combine` applies it, per model: keep bottom <= |tau| <= top, then of the entries
    whose |tau| is an edge value, drop those numbered (in flat order over this piece) outside the edge's
    [low, high) (`sparsify.BandPlan`)."""

    plans: Sequence[BandPlan]


class _Sparsify(ctypes.Structure):
    """combine_kernels.c's Sparsify: how combine sparsifies each tau as it reads it."""

    _fields_ = [("thresholds", ctypes.c_void_p), ("keys", ctypes.c_void_p), ("position", ctypes.c_int64),
                ("density", ctypes.c_float), ("factors", ctypes.c_void_p), ("divide", ctypes.c_int),
                ("band", ctypes.c_void_p), ("edges", ctypes.c_void_p), ("ranges", ctypes.c_void_p)]


def _band_arrays(band: BandKeep) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparsify's band, edges and ranges (NaN: no edge)."""
    bounds = np.asarray([(plan.top, plan.bottom) for plan in band.plans], np.float32)
    edges = np.full((len(band.plans), 2), np.nan, np.float32)
    ranges = np.zeros((len(band.plans), 2, 2), np.int64)
    for m, plan in enumerate(band.plans):
        for e, (value, low, high) in enumerate(plan.edges):
            edges[m, e], ranges[m, e] = value, (low, high)
    return bounds, edges, ranges


def combine(taus: Sequence[torch.Tensor] | Bf16Sources, weights: Sequence[float], ties: bool, scale: float,
            thresholds: Sequence[float] | None = None, dare: DareDrop | None = None,
            band: BandKeep | None = None) -> torch.Tensor:
    """consensus.combine(...) * scale of the taus as given, or sparsified as they are read (one pass): with
    `thresholds`, of [keep_at_least(tau_i, thresholds[i])]; with `dare`, of [sparsify.dare_drop(tau_i, ...)]
    with uniform = the numbers of stream dare.keys[i] from dare.position; with `band`, of the breadcrumbs band
    of each tau_i. Given `Bf16Sources`, each tau_i is formed tile by tile from the bf16 inputs (the same bits as
    from `bf16_deltas`' task vectors)."""
    sources = taus if isinstance(taus, Bf16Sources) else None
    tensors = sources.models if sources is not None else taus
    out = torch.empty(tensors[0].shape, dtype=torch.float32)
    pointers, models, w, unit = _model_args(tensors, weights)
    trim = None if thresholds is None else np.asarray(thresholds, np.float32)
    keys = None if dare is None else np.asarray(dare.keys, np.uint64)
    factors = None if dare is None else np.asarray(dare.factors, np.float32)
    bounds, edges, ranges = (None, None, None) if band is None else _band_arrays(band)
    sparsify = _Sparsify(None if trim is None else _ptr(trim), None if keys is None else _ptr(keys),
                         0 if dare is None else dare.position, 0.0 if dare is None else dare.density,
                         None if factors is None else _ptr(factors), int(dare is not None and dare.divide),
                         *(None if a is None else _ptr(a) for a in (bounds, edges, ranges)))
    if _lib().combine(pointers, None if sources is None else _ptr(sources.base), models, _ptr(w), _ptr(unit),
                      ctypes.byref(sparsify), int(ties), scale, out.numel(), _ptr(out)) != 0:
        raise MemoryError(f"combine: no memory for the tiles of {models} models")
    return out


def della_drop_rows(tau: torch.Tensor, uniform: torch.Tensor, keep_prob: torch.Tensor) -> torch.Tensor:
    """keep(uniform < p, tau / p) with p = keep_prob[row magnitude rank] (sparsify.della_drop's torch path)."""
    return _della_rows(KernelTau(tau), uniform, 0, 0, keep_prob)


def della_drop_drawn(tau: KernelTau, key: int, position: int, keep_prob: torch.Tensor) -> torch.Tensor:
    """`della_drop_rows` with the numbers of stream `key` from `position` (rng.uniform_like's), drawn row by row
    inside the kernel, and the task vector formed row by row from bf16 inputs when given so: neither is stored."""
    return _della_rows(tau, None, key, position, keep_prob)


def _della_rows(tau: KernelTau, uniform: torch.Tensor | None, key: int, position: int,
                keep_prob: torch.Tensor) -> torch.Tensor:
    out = torch.empty(tau.x.shape, dtype=torch.float32)
    row_len = tau.x.shape[-1]
    if _lib().della_rows(_ptr(tau.x), _base(tau.base), None if uniform is None else _ptr(uniform), key, position,
                         _ptr(keep_prob.contiguous()), tau.x.numel() // row_len, row_len, _ptr(out)) != 0:
        raise MemoryError(f"della: no scratch memory for rows of {row_len}")
    return out


def ram_overlap_counts(taus: Sequence[torch.Tensor], weights: Sequence[float],
                       epsilon: float) -> tuple[list[int], list[int]]:
    """ram._overlap_counts(*ram._activity(weighted taus, epsilon)): per model (shared, unique) counts."""
    shared = torch.zeros(len(taus), dtype=torch.int64)
    unique = torch.zeros(len(taus), dtype=torch.int64)
    pointers, models, w, unit = _model_args(taus, weights)
    _lib().ram_overlap_counts(pointers, models, _ptr(w), _ptr(unit), epsilon, taus[0].numel(), _ptr(shared),
                              _ptr(unique))
    return shared.tolist(), unique.tolist()


def ram_combine(taus: Sequence[torch.Tensor], weights: Sequence[float], epsilon: float,
                unique_scales: Sequence[float]) -> torch.Tensor:
    """ram.ram_combine over the weighted taus and their activity."""
    out = torch.empty_like(taus[0])
    pointers, models, w, unit = _model_args(taus, weights)
    scales = np.asarray(unique_scales, np.float32)
    _lib().ram_combine(pointers, models, _ptr(w), _ptr(unit), epsilon, _ptr(scales), out.numel(), _ptr(out))
    return out


def warm_up() -> bool:
    """Build (or find) the kernel library; False when the kernels are off. Installing runs this once."""
    return _switched_on()
