"""The whole-tensor statistics that let every method merge in row chunks: exact order statistics (radix
passes), exact L1 sums, the breadcrumbs band ranked like a stable sort, DELLA row ranks, and method outputs
that do not depend on the thread count or on how a tensor is cut into chunks.

References are computed the slow obvious way (sorts, Python fractions), never with the code under test.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from distmerge.methods import MergeInputs, TensorContext, exact, get_method, method_names, radix, select
from distmerge.methods.sparsify import band_ranks, breadcrumbs_band, row_magnitude_ranks
from distmerge.methods.stats import (
    chunked_tensor_stats,
    fold_partials,
    sum_partials,
    with_prefix_stats,
    with_stats,
)


def tie_heavy(*shape, seed=0) -> torch.Tensor:
    """Values on a coarse grid (many exact repeats, like differences of bf16 weights), some zeros."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(-40, 41, shape, generator=gen).float() * 0.125
    values.view(-1)[::7] = 0.0
    return values


def stable_band_reference(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    numel = tau.numel()
    first, stop = band_ranks(numel, density, gamma)
    order = torch.sort(tau.abs().flatten(), descending=True, stable=True).indices
    keep = torch.zeros(numel, dtype=torch.bool)
    keep[order[first:stop]] = True
    return torch.where(keep.view(tau.shape), tau, torch.zeros_like(tau))


@pytest.mark.parametrize("numel", [1000, 200_000])  # the sort path and the histogram path
def test_order_statistics_are_exact(numel):
    tau = tie_heavy(numel) * torch.logspace(-3, 3, numel)  # several exponents, and repeats
    ordered = tau.abs().sort(descending=True).values
    for rank in (0, 1, numel // 3, numel - 1):
        stat = radix.tensor_order_statistics(tau.abs(), [rank])[0]
        assert stat.value == ordered[rank].item()
        assert stat.greater == int((tau.abs() > stat.value).sum())
        assert stat.equal == int((tau.abs() == stat.value).sum())


def test_order_statistic_phases_over_chunks_match_the_whole_tensor():
    tau = tie_heavy(300, 500)
    phases = radix.order_statistic_phases("t", lambda numel, params: [7, numel // 2, numel - 1])
    pieces = [MergeInputs(torch.zeros(100, 500), [tau[i:i + 100]], [1.0]) for i in (0, 100, 200)]
    totals = chunked_tensor_stats(phases, None, lambda: ((p, TensorContext("t")) for p in pieces))
    whole = radix.tensor_order_statistics(tau.abs(), [7, tau.numel() // 2, tau.numel() - 1])
    assert radix.order_statistics(totals, "t")[0] == whole
    # Two ranks (the one-pass pair kernel): partials added in place (map_into) sum as the separate maps do.
    high, low = radix.order_statistic_phases("p", lambda numel, params: [3, numel // 3])
    stats: dict = {}
    for phase in (high, low):
        items = [(p, TensorContext("p", stats=dict(stats))) for p in pieces]
        folded = fold_partials(phase, None, items)
        summed = sum_partials(phase.map(p, None, ctx) for p, ctx in items)
        assert folded.keys() == summed.keys() and all(torch.equal(folded[k], summed[k]) for k in folded)
        stats.update(phase.finalize(folded, None))
    assert radix.order_statistics(stats, "p")[0] == radix.tensor_order_statistics(tau.abs(), [3, tau.numel() // 3])


def test_exact_abs_sum_ignores_order_and_cut():
    x = torch.randn(50_000) * torch.logspace(-40, 30, 50_000)  # subnormals to huge values
    reference = float(sum(Fraction(abs(v)) for v in x.tolist()))
    assert exact.partial_value(exact.abs_sum_partial(x)) == reference
    cut = exact.abs_sum_partial(x[:12345]) + exact.abs_sum_partial(x[12345:].flip(0))
    assert exact.partial_value(cut) == reference


@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.2), (0.3, 0.0), (0.05, 0.9), (1.0, 0.0)])
def test_breadcrumbs_band_ranks_like_a_stable_sort(density, gamma):
    tau = tie_heavy(64, 90)
    assert torch.equal(breadcrumbs_band(tau, density, gamma), stable_band_reference(tau, density, gamma))


@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.2), (0.3, 0.1)])
def test_breadcrumbs_merged_in_chunks_equals_whole(density, gamma):
    """The executor's path: tensor phases over the chunks (prefix counts break ties), then each chunk."""
    taus = [tie_heavy(64, 90, seed=s) for s in range(3)]
    method = get_method("breadcrumbs")
    params = method.parse_params({"density": density, "gamma": gamma})
    whole = method.merge(MergeInputs(torch.zeros(64, 90), taus, [1.0] * 3), params, TensorContext("w"))
    rows = [(0, 10), (10, 11), (11, 40), (40, 64)]

    def pieces():
        for start, stop in rows:
            ctx = TensorContext("w", offset=start * 90, numel=64 * 90)
            yield MergeInputs(torch.zeros(stop - start, 90), [t[start:stop] for t in taus], [1.0] * 3), ctx

    phases = method.tensor_phases(params)
    totals = chunked_tensor_stats(phases, params, pieces)
    items = ((ctx, inputs, ctx) for inputs, ctx in pieces())
    chunks, befores = [], []
    for (inputs, _), (ctx, stats) in zip(pieces(), with_prefix_stats(phases, params, items, totals), strict=True):
        chunks.append(method.merge(inputs, params, with_stats(ctx, stats)))
        befores.append(stats.get("breadcrumbs_equal_before"))
    assert torch.equal(torch.cat(chunks), whole)
    assert any(b and any(x > 0 for row in b for x in row) for b in befores)  # ties straddled a chunk edge


def test_row_ranks_match_a_stable_argsort():
    tau = tie_heavy(50, 33)
    reference = torch.sort(tau.abs(), dim=-1, stable=True).indices.argsort(dim=-1)
    assert torch.equal(row_magnitude_ranks(tau), reference)


@pytest.mark.parametrize("name", method_names())
def test_outputs_do_not_depend_on_the_thread_count(name):
    """Large enough tensors that torch splits every op across threads; float reductions must not care."""
    method = get_method(name)
    params = method.parse_params({"rescale": "l1"} if name.startswith("dare") else {})
    taus = [torch.randn(300, 400, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    inputs = MergeInputs(torch.randn(300, 400), taus, [1.0, 0.7, 1.3])
    ctx = TensorContext("w", seed=1, stats={"ram_plus_lambdas": [1.1, 1.2, 1.0]})
    if name == "ties":
        params = method.parse_params({"trim_scope": "tensor"})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = method.merge(inputs, params, ctx)
        torch.set_num_threads(4)
        four = method.merge(inputs, params, ctx)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, four)


SPECIALS = [1.0, -2.0, float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 3e-45, -1e38]


@pytest.mark.parametrize("pattern", ["mixed", "all", "none"])
def test_bitwise_selection_gives_torch_where_bits(pattern):
    """select.keep / select.choose replace torch.where in every method: the same bits, NaN and -0.0 included."""
    x = torch.tensor(SPECIALS * 50)
    y = torch.tensor(SPECIALS[::-1] * 50)
    mask = {"mixed": torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.5,
            "all": torch.ones(x.shape, dtype=torch.bool), "none": torch.zeros(x.shape, dtype=torch.bool)}[pattern]
    y_before = y.clone()
    assert torch.equal(select.keep(mask, x).view(torch.int32), torch.where(mask, x, 0.0).view(torch.int32))
    assert torch.equal(select.choose(mask, x, y).view(torch.int32), torch.where(mask, x, y).view(torch.int32))
    assert torch.equal(y.view(torch.int32), y_before.view(torch.int32))  # inputs are never modified
    shaped = x.reshape(10, -1)
    assert torch.equal(select.keep(mask.reshape(10, -1), shaped).view(torch.int32),
                       torch.where(mask.reshape(10, -1), shaped, 0.0).view(torch.int32))


def reference_number(key: int, j: int) -> float:
    """Number j of stream `key` as rng's docstring defines it, in Python integers (an independent reference)."""
    low64 = (1 << 64) - 1
    z = (key + (j // 2 + 1) * 0x9E3779B97F4A7C15) & low64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & low64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & low64
    z ^= z >> 31
    word = z >> 32 if j % 2 else z & 0xFFFFFFFF
    return (word >> 8) * 2.0**-24


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_mask_numbers_follow_the_documented_construction(monkeypatch, kernels):
    """rng's numbers, from the C kernel or numpy, are SplitMix64's outputs split in halves, 24 bits each;
    their mean and the rate below a density are those of uniform numbers."""
    from distmerge.methods.rng import mask_key, stream_numbers

    monkeypatch.setenv("DISTMERGE_KERNELS", kernels)
    key = mask_key(3, "w", 1)
    for position, count in [(0, 1), (0, 1001), (1, 10), (7, 1), (4095, 5000), (2**40 + 1, 9), (5, 0)]:
        drawn = stream_numbers(key, position, count)
        assert drawn.dtype == torch.float32 and drawn.shape == (count,)
        assert drawn.tolist() == [reference_number(key, position + i) for i in range(count)], (position, count)
    many = stream_numbers(key, 0, 1 << 20)
    assert abs(float(many.double().mean()) - 0.5) < 2e-3 and abs(float((many < 0.3).double().mean()) - 0.3) < 2e-3
