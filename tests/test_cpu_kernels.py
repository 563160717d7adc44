"""The fused CPU kernels give the torch path's bits: per kernel on adversarial inputs, and per method on whole
merges of the tiny family (DISTMERGE_KERNELS=torch switches the kernels off)."""

from __future__ import annotations

import pytest
import torch

from distmerge import merge_core
from distmerge.methods import cpu_kernels, exact, method_names, radix, rng, sparsify
from distmerge.methods.consensus import combine
from distmerge.methods.registry import Bf16Sources, MergeInputs, TensorContext, get_method
from distmerge.methods.stats import chunked_tensor_stats
from tests.test_chunking import run
from tests.test_ray_merge import merge

pytestmark = pytest.mark.skipif(not cpu_kernels.warm_up(), reason="no C compiler to build the CPU kernels")


def adversarial(seed: int, n: int = 200_003, nan: bool = True) -> torch.Tensor:
    """bf16-rounded values (many exact ties), exact zeros, -0.0, huge, tiny and subnormal values, NaN."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=gen) * 0.01).bfloat16().float()
    pick = torch.randint(0, 50, (n,), generator=gen)
    x[pick == 0] = 0.0
    x[pick == 1] = -0.0
    x[pick == 2] = 3e38
    x[pick == 3] = 1e-40
    if nan:
        x[pick == 4] = float("nan")
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, except that a NaN matches any NaN: IEEE leaves the sign and payload of a NaN made by an
    operation (inf - inf) to the hardware, and torch's vector code and the kernels' differ there."""
    if a.shape != b.shape:
        return False
    differ = a.contiguous().view(torch.int32) != b.contiguous().view(torch.int32)
    return bool((a[differ].isnan() & b[differ].isnan()).all())


@pytest.fixture
def torch_path(monkeypatch):
    """Run a callable with the kernels switched off."""
    def run(fn, *args, **kwargs):
        with monkeypatch.context() as patch:
            patch.setenv("DISTMERGE_KERNELS", "torch")
            assert not cpu_kernels.enabled(torch.zeros(1))
            return fn(*args, **kwargs)
    return run


def test_bf16_deltas_equal_torch():
    base = adversarial(4, n=5003).bfloat16()  # not a multiple of the tile: the tail too
    models = [adversarial(5 + m, n=5003).bfloat16() for m in range(3)]
    assert cpu_kernels.takes_bf16_deltas(base, models)
    theta0, taus = cpu_kernels.bf16_deltas(base, models)
    assert same_bits(theta0, base.float())
    for model, tau in zip(models, taus, strict=True):
        assert same_bits(tau, model.float() - base.float())


def test_add_to_bf16_rounds_as_torch():
    """Ties to even, overflow to infinity, subnormals, -0.0, NaN: the bits of torch's add and conversion."""
    delta, target = adversarial(1), adversarial(2)
    halfway = torch.tensor([1.00390625, 1.01171875, -1.00390625, 3.3961e38, 1e-40, -0.0, 0.0])
    delta[:7], target[:7] = halfway, torch.zeros(7)
    fused = cpu_kernels.add_to_bf16(delta, target)
    assert torch.equal(fused.view(torch.int16), (delta + target).to(torch.bfloat16).view(torch.int16))
    assert torch.equal(delta[:7], halfway)  # inputs untouched


@pytest.mark.parametrize("sparse", [False, True])  # mostly zeros (an RL vector) takes the kernels' other loops
def test_histograms_equal_bincount(torch_path, sparse):
    tau = adversarial(0)
    if sparse:
        tau = tau * (torch.rand(tau.shape, generator=torch.Generator().manual_seed(1)) < 0.03)
    assert torch.equal(radix._high_histogram(tau), torch_path(radix._high_histogram, tau))
    for high_bin in (0, 1, 0x3C23, 0x7F7F, 0x7FC0, 0x7FFF):  # |tau| bits have high bins < 0x8000
        fused = radix._bin_histogram(tau, high_bin)
        reference = torch_path(radix._bin_histogram, tau, high_bin)
        assert torch.equal(fused[0], reference[0]) and fused[1] == reference[1], high_bin
    bins = (0, 1, 0x3C23, 0x7FC0, 0x7FFF)
    for pair in [(a, b) for a in bins for b in bins]:  # equal bins included: each gets the whole histogram
        # Both add to what they hold (a running sum over chunks).
        into, above = torch.full((2, radix.NUM_BINS), 5, dtype=torch.int64), torch.full((2,), 7, dtype=torch.int64)
        cpu_kernels.add_bin_histogram_pair(tau, pair, into, above)
        for r, high_bin in enumerate(pair):
            reference = torch_path(radix._bin_histogram, tau, high_bin)
            assert torch.equal(into[r], reference[0] + 5) and above[r] == reference[1] + 7, pair


def test_bf16_delta_equals_torch():
    """For every bf16 bit pattern (NaNs, infinities, -0.0, subnormals) the fused delta equals torch's widening
    then subtracting, against adversarial theta0 values."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    widened = every.to(torch.float32)
    assert cpu_kernels.takes_bf16_delta(every, widened)
    theta0 = adversarial(7, n=every.numel())
    assert same_bits(cpu_kernels.bf16_delta(every, theta0), widened - theta0)
    chunk = every[1000:1000 + 4097].reshape(17, 241)  # an odd-sized 2-D piece, as a row chunk is
    assert same_bits(cpu_kernels.bf16_delta(chunk, theta0[:4097].reshape(17, 241)),
                     chunk.float() - theta0[:4097].reshape(17, 241))


@pytest.mark.parametrize("threshold", [0.0, 0.004, 3e38, float(torch.tensor(0.01).bfloat16())])
def test_keep_above_and_topk(torch_path, threshold):
    tau = adversarial(1, n=401 * 450).view(401, 450)
    assert same_bits(sparsify.keep_above(tau, threshold), torch_path(sparsify.keep_above, tau, threshold))
    assert same_bits(sparsify.magnitude_topk(tau, 0.2), torch_path(sparsify.magnitude_topk, tau, 0.2))


@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.1), (0.3, 0.0)])
def test_breadcrumbs_band(torch_path, density, gamma):
    tau = adversarial(2, nan=False)
    fused = sparsify.breadcrumbs_band(tau, density, gamma)
    assert same_bits(fused, torch_path(sparsify.breadcrumbs_band, tau, density, gamma))
    for values in ([0.0, float(tau[7].abs())], [float(tau.abs().max())], []):
        expected = [int((tau.abs() == v).sum()) for v in values]
        assert cpu_kernels.count_equal_magnitudes(tau, values).tolist() == expected


@pytest.mark.parametrize("low,high", [(0, 3), (5, 40), (-2, 200), (50, 10), (0, 10**6), (31, 33), (200, 470)])
@pytest.mark.parametrize("dense", [False, True])
def test_drop_equal_outside_numbers_ties_across_skipped_spans(low, high, dense):
    # Ties scattered far apart (most spans hold none and are skipped), in a run, and at both ends; or 5% of
    # the entries (most spans hold some: all kept, all dropped, or across low or high).
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(10_001, generator=gen) * 0.01).bfloat16().float()
    x[(x.abs() == 0.5)] = 0.25
    where = [0, 1, 2, 97, 500, 501, 502, 503, 2048, 4095, 4096, *range(7000, 7040), 10_000]
    if dense:
        where = sorted({*where, *torch.randperm(10_001, generator=gen)[:500].tolist()})
    x[where] = torch.tensor([0.5 if i % 3 else -0.5 for i in range(len(where))])
    out = x.clone()
    cpu_kernels.drop_equal_outside(out, x, 0.5, low, high)
    expected = x.clone()
    for rank, i in enumerate(where):
        if rank < low or rank >= high:
            expected[i] = 0.0
    assert same_bits(out, expected)


@pytest.mark.parametrize("density", [0.3, 0.9, "drawn"])  # drawn: one entry's number exactly
def test_dare_l1_partials_from_the_kernels_numbers(torch_path, density):
    key, position = rng.mask_key(5, "w", 0), 1001  # odd: the stream entered mid-word
    for tau in (adversarial(3), adversarial(3, nan=False)):  # with NaN: counted, not summed
        uniform = rng.stream_numbers(key, position, tau.numel())
        threshold = float(uniform[10]) if density == "drawn" else density
        fused = exact.dare_abs_partial(tau, key, position, threshold)
        assert torch.equal(fused, torch_path(exact.abs_sum_partial, tau, uniform < threshold))


@pytest.mark.parametrize("rescale,density", [("inverse_p", 0.3), ("l1", 0.5), ("l1", "drawn")])
@pytest.mark.parametrize("consensus", ["sum", "ties"])
def test_dare_fused_into_combine(torch_path, rescale, density, consensus):
    """combine's DARE mode equals sparsify.dare_drop of each tau (torch path), then combine."""
    taus = [adversarial(20 + i, nan=False) for i in range(3)]
    weights, position = [1.0, 0.5, 2.0], 7
    keys = [rng.mask_key(1, "w", i) for i in range(3)]
    uniforms = [rng.stream_numbers(key, position, taus[0].numel()) for key in keys]
    density = float(uniforms[0][10]) if density == "drawn" else density
    partials = [exact.abs_sum_partial(t, u < density) for t, u in zip(taus, uniforms, strict=True)]
    factors = ([density] * 3 if rescale == "inverse_p"
               else [sparsify.l1_rescale_factor(*map(exact.partial_value, p)) for p in partials])
    drop = cpu_kernels.DareDrop(keys, position, density, factors, divide=rescale == "inverse_p")
    fused = cpu_kernels.combine(taus, weights, consensus == "ties", 0.7, dare=drop)

    def drop_then_combine():
        dropped = [sparsify.dare_drop(t, density, rescale, u, None if rescale == "inverse_p" else f)
                   for t, u, f in zip(taus, uniforms, factors, strict=True)]
        return combine(consensus, dropped, weights) * 0.7

    assert same_bits(fused, torch_path(drop_then_combine))


def bf16_inputs(n: int = 20_003) -> Bf16Sources:
    """Adversarial bf16 inputs: their task vectors hold NaN, infinities (3e38 - -3e38 overflows), ties, zeros."""
    return Bf16Sources(adversarial(40, n).bfloat16(), [adversarial(41 + m, n).bfloat16() for m in range(3)])


def not_widened(sources: Bf16Sources) -> MergeInputs:
    def widen(_):
        raise AssertionError("a kernel path formed the fp32 task vectors")
    return MergeInputs.from_bf16(sources, [1.0, 0.5, 2.0], widen)


@pytest.mark.parametrize("consensus", ["sum", "ties"])
def test_kernels_read_bf16_inputs_as_their_task_vectors(consensus):
    """combine, DARE's L1 partials, the histograms, the counts and the final add take the bf16 inputs as read:
    the results of the same kernels over bf16_deltas' fp32 task vectors, whichever sparsifier rides along."""
    sources = bf16_inputs()
    theta0, taus = cpu_kernels.bf16_deltas(sources.base, sources.models)
    weights, ties = [1.0, 0.5, 2.0], consensus == "ties"
    keys = [rng.mask_key(3, "w", m) for m in range(3)]
    drop = cpu_kernels.DareDrop(keys, 5, 0.4, [1.5, 2.0, 0.5], divide=False)
    thresholds = [float(taus[0].abs()[7]), 0.0, 1e-3]
    for extra in ({}, {"dare": drop}, {"thresholds": thresholds}):
        fused = cpu_kernels.combine(sources, weights, ties, 0.7, **extra)
        assert same_bits(fused, cpu_kernels.combine(taus, weights, ties, 0.7, **extra))
    for model, tau, key in zip(sources.models, taus, keys, strict=True):
        from_bf16 = exact.dare_abs_partial(model, key, 11, 0.4, base=sources.base)
        assert torch.equal(from_bf16, exact.dare_abs_partial(tau, key, 11, 0.4))
        high, high_bf16 = torch.zeros(2, radix.NUM_BINS, dtype=torch.int64)
        cpu_kernels.add_high_histogram(tau, high)
        cpu_kernels.add_high_histogram(model, high_bf16, sources.base)
        assert torch.equal(high, high_bf16)
        bins = (int(high.nonzero()[-3]), int(high.argmax()))  # a sparse bin and the fullest
        low, low_bf16 = torch.zeros(2, 2, radix.NUM_BINS, dtype=torch.int64)
        above, above_bf16 = torch.zeros(2, 2, dtype=torch.int64)
        cpu_kernels.add_bin_histogram_pair(tau, bins, low, above)
        cpu_kernels.add_bin_histogram_pair(model, bins, low_bf16, above_bf16, sources.base)
        assert torch.equal(low, low_bf16) and torch.equal(above, above_bf16)
        one_bin = torch.zeros(radix.NUM_BINS, dtype=torch.int64)
        assert cpu_kernels.add_bin_histogram(model, bins[1], one_bin, sources.base) == above[1]
        assert torch.equal(one_bin, low[1])
        values = [float(tau.abs()[3]), 0.0]
        assert torch.equal(cpu_kernels.count_equal_magnitudes(model, values, sources.base),
                           cpu_kernels.count_equal_magnitudes(tau, values))
    delta = adversarial(50, sources.base.numel())
    assert torch.equal(cpu_kernels.add_to_bf16(delta, sources.base).view(torch.int16),
                       cpu_kernels.add_to_bf16(delta, theta0).view(torch.int16))


@pytest.mark.parametrize("method,params", [("dare_ties", {"rescale": "l1"}), ("dare_linear", {}), ("ties", {}),
                                           ("task_arithmetic", {}), ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
                                           ("breadcrumbs_ties", {}), ("della", {}), ("della_linear", {})])
def test_kernel_merges_never_form_fp32_task_vectors(method, params):
    """From bf16 inputs these methods merge on the inputs as read; the torch path gives the same bits."""
    sources = bf16_inputs()
    sources.base[:] = sources.base.nan_to_num(0.0)  # NaN-free: the torch path's NaN signs may differ
    for model in sources.models:
        model[:] = model.nan_to_num(0.0)
    merge_method = get_method(method)
    parsed = merge_method.parse_params(params)
    stats = {}
    if merge_method.tensor_phases(parsed):  # as the executor runs them over the chunks of a large tensor
        phases, whole = merge_method.tensor_phases(parsed), TensorContext("w", numel=sources.base.numel())
        stats = chunked_tensor_stats(phases, parsed, lambda: [(not_widened(sources), whole)])
    ctx = TensorContext("w", stats=stats, numel=sources.base.numel()) if stats else TensorContext("w")
    fused = merge_method.merge(not_widened(sources), parsed, ctx)
    theta0, taus = cpu_kernels.bf16_deltas(sources.base, sources.models)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTMERGE_KERNELS", "torch")
        assert same_bits(fused, merge_method.merge(MergeInputs(theta0, taus, [1.0, 0.5, 2.0]), parsed, ctx))


@pytest.mark.parametrize("offset", [0, 896 * 5 + 3])
def test_della_kernel_draws_and_forms_each_row_as_the_torch_path_reads_them(offset):
    """DELLA from bf16 inputs draws each row's numbers and forms its task vector row by row (none stored): the
    torch path's bits, also for a row chunk that starts inside its tensor (numbers from its offset on)."""
    rows, row_len = 9, 896
    flat = bf16_inputs(rows * row_len)
    base, *models = [x.nan_to_num(0.0).view(rows, row_len) for x in (flat.base, *flat.models)]
    sources = Bf16Sources(base, models)
    merge_method = get_method("della")
    parsed = merge_method.parse_params({"density": 0.4, "epsilon": 0.2})
    ctx = TensorContext("w", seed=7, offset=offset)
    fused = merge_method.merge(not_widened(sources), parsed, ctx)
    theta0, taus = cpu_kernels.bf16_deltas(sources.base, sources.models)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTMERGE_KERNELS", "torch")
        assert same_bits(fused, merge_method.merge(MergeInputs(theta0, taus, [1.0, 0.5, 2.0]), parsed, ctx))


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, 1.0, 0.7], [1.0, -0.5, 0.25], [2.0]])
@pytest.mark.parametrize("consensus", ["sum", "ties"])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_combine(torch_path, weights, consensus, scale):
    taus = [adversarial(10 + i) for i in range(len(weights))]
    taus[0][:100] = -taus[-1][:100]  # sign votes that cancel exactly
    fused = cpu_kernels.combine(taus, weights, consensus == "ties", scale)
    assert same_bits(fused, torch_path(lambda: combine(consensus, taus, weights) * scale))
    # TIES's trim fused in (thresholds at a repeated value, at 0: every number kept, NaN dropped, and inf).
    thresholds = [float(taus[0].abs()[7]), 0.0, float("inf")][:len(taus)]

    def trim_then_combine():
        kept = [sparsify.keep_above(t, h) for t, h in zip(taus, thresholds, strict=True)]
        return combine(consensus, kept, weights) * scale

    trimmed = cpu_kernels.combine(taus, weights, consensus == "ties", scale, thresholds)
    assert same_bits(trimmed, torch_path(trim_then_combine))


@pytest.mark.parametrize("method", method_names())
def test_whole_merges_equal_with_and_without_kernels(tiny_family, tmp_path, monkeypatch, method):
    fused = merge(tiny_family, method, tmp_path / "fused", 0)
    monkeypatch.setenv("DISTMERGE_KERNELS", "torch")
    assert merge(tiny_family, method, tmp_path / "torch", 0) == fused


@pytest.mark.parametrize("method,params", [("linear", {}), ("dare_ties", {"rescale": "l1"}), ("della", {}),
                                           ("ties", {}), ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
                                           ("breadcrumbs_ties", {})])
def test_bf16_merges_equal_with_and_without_kernels(bf16_family, tmp_path, monkeypatch, method, params):
    """bf16 in and out: the kernels reading the bf16 inputs (the fused drop, trim and band, the histograms)
    and add_to_bf16 against the torch path, chunks included."""
    monkeypatch.setattr(merge_core, "CHUNK_ELEMENTS", 700)
    fused = run(bf16_family, method, params, tmp_path / "fused")
    monkeypatch.setenv("DISTMERGE_KERNELS", "torch")
    assert run(bf16_family, method, params, tmp_path / "torch") == fused


@pytest.mark.parametrize("start,count", [(0, 1 << 20), (3, 1 << 20), (4, 6), (5, 1), (2**50 + 1, 4097)])
def test_random_stream_same_numbers(torch_path, start, count):
    key = rng.mask_key(7, "layer.weight", 2)
    fused = rng.stream_numbers(key, start, count)
    assert torch.equal(fused, torch_path(rng.stream_numbers, key, start, count))


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 1.0, 2.0]])
@pytest.mark.parametrize("scales", [[1.0, 1.0, 1.0], [1.2, 1.0, 1.05]])
def test_ram(torch_path, weights, scales):
    from distmerge.methods import ram

    gen = torch.Generator().manual_seed(4)
    taus = [adversarial(20 + i, nan=False) * (torch.rand(200_003, generator=gen) < 0.3) for i in range(3)]
    taus[1][:50] = 1e-5  # exactly at epsilon: inactive
    inputs = ram.MergeInputs(torch.zeros(200_003), taus, weights)

    def reference():
        weighted = ram._weighted(inputs)
        masks, count = ram._activity(weighted, 1e-5)
        return ram._overlap_counts(masks, count), ram.ram_combine(weighted, masks, count, scales)

    counts, combined = torch_path(reference)
    assert cpu_kernels.ram_overlap_counts(taus, weights, 1e-5) == (list(counts[0]), list(counts[1]))
    assert same_bits(cpu_kernels.ram_combine(taus, weights, 1e-5, scales), combined)


@pytest.mark.parametrize("row_len", [1, 2, 300, 4864])
def test_della_row_ranks(torch_path, row_len):
    tau = adversarial(30, n=row_len * 41, nan=False).view(41, row_len)
    tau[3] = 0.01  # a row of equal magnitudes: ranks by column
    tau[5] = 0.0  # all zeros: ranks by column, nothing left to sort
    tau[6, ::2] = -0.0  # -0.0 ranks with +0.0, by column
    uniform = torch.rand(tau.shape, generator=torch.Generator().manual_seed(31))
    fused = sparsify.della_drop(tau, 0.5, 0.15, uniform)
    assert same_bits(fused, torch_path(sparsify.della_drop, tau, 0.5, 0.15, uniform))


def della_rows(kind: str, rows: int, row_len: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(32)
    if kind == "sparse":  # an RL-like vector: most entries exactly zero
        tau = torch.randn(rows, row_len, generator=gen) * 1e-3
        return tau * (torch.rand(rows, row_len, generator=gen) < 0.03)
    if kind == "bf16_deltas":  # differences of bf16 weights: few distinct magnitudes, many repeated
        base = (torch.randn(rows, row_len, generator=gen) * 0.02).bfloat16()
        return (base + torch.randn(rows, row_len, generator=gen).bfloat16() * 1e-3).float() - base.float()
    # Distinct fp32 magnitudes crowded into one bucket by two outliers per row: the kernel's insertion sort
    # would go quadratic, so it ranks these rows by radix instead.
    tau = 1.0 + torch.rand(rows, row_len, generator=gen) * 1e-3
    tau[:, 5], tau[:, 7] = 1e30, -1e-30
    return tau


@pytest.mark.parametrize("kind", ["sparse", "bf16_deltas", "crowded_by_outliers"])
@pytest.mark.parametrize("row_len", [896, 4864, 1001])
@pytest.mark.parametrize("portable", [False, True])  # the AVX-512 compaction of a row where the CPU has it
def test_della_row_ranks_on_typical_and_crowded_rows(torch_path, kind, row_len, portable, monkeypatch):
    monkeypatch.setenv("DISTMERGE_NO_AVX512", "1" if portable else "")
    tau = della_rows(kind, 7, row_len)
    uniform = torch.rand(tau.shape, generator=torch.Generator().manual_seed(33))
    fused = sparsify.della_drop(tau, 0.3, 0.15, uniform)
    assert same_bits(fused, torch_path(sparsify.della_drop, tau, 0.3, 0.15, uniform))


@pytest.mark.parametrize("compiler", [None, "false"])  # no compiler at all; one whose build fails
def test_without_a_working_compiler_merges_take_the_torch_path(tiny_family, tmp_path, monkeypatch, caplog,
                                                               compiler):
    from distmerge.methods import native

    fused = merge(tiny_family, "ties", tmp_path / "fused", 0)
    monkeypatch.setattr(native, "_candidates", lambda name: [tmp_path / "cache" / name])
    monkeypatch.setattr(native, "_compiler", lambda: compiler)
    native.library.cache_clear()
    try:
        assert not cpu_kernels.enabled(torch.zeros(1))
        assert "torch path" in caplog.text
        assert merge(tiny_family, "ties", tmp_path / "torch", 0) == fused
    finally:
        native.library.cache_clear()
