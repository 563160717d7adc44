"""TIES (per tensor), DARE, breadcrumbs, DELLA: sparsifiers, consensus, determinism.

Expected values are worked by hand in the comments, never computed with the code under test.
"""

from __future__ import annotations

import pytest
import torch

from distmerge.methods import MergeInputs, TensorContext, get_method
from distmerge.methods.rng import mask_key, uniform_like
from distmerge.methods.sparsify import (
    breadcrumbs_band,
    dare_drop,
    della_drop,
    magnitude_topk,
    row_magnitude_ranks,
)


def merge(name, deltas, weights=None, seed=0, tensor="t", **params):
    method = get_method(name)
    deltas = [torch.as_tensor(d, dtype=torch.float32) for d in deltas]
    inputs = MergeInputs(torch.zeros_like(deltas[0]), deltas, list(weights or [1.0] * len(deltas)))
    return method.merge(inputs, method.parse_params(params), TensorContext(tensor, seed))


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


# --- TIES ------------------------------------------------------------------------------------------------

TIES_DELTAS = [[0.9, -0.1, 0.3, -0.5], [-0.4, 0.2, 0.6, -0.05], [0.1, -0.8, 0.4, 0.2]]


def test_ties_hand_example():
    # density 0.5 of 4 entries: k = 2 per model.
    #   trimmed: [0.9, 0, 0, -0.5], [-0.4, 0, 0.6, 0], [0, -0.8, 0.4, 0]; weights [1, 2, 1]
    #   weighted sum [0.9 - 0.8, -0.8, 1.2 + 0.4, -0.5] -> signs [+, -, +, -]
    #   agreeing: e0 {m1}: 0.9; e1 {m3}: -0.8; e2 {m2 (w 2), m3 (w 1)}: (1.2 + 0.4) / 3; e3 {m1}: -0.5
    #   times lambda 2
    out = merge("ties", TIES_DELTAS, [1.0, 2.0, 1.0], density=0.5, **{"lambda": 2.0})
    close(out, [1.8, -1.6, 2 * 1.6 / 3, -1.0])


def test_ties_nothing_agrees_gives_zero():
    # density 1: sums [1 - 1, 2 - 3] -> signs [0, -]; e0 nothing agrees with 0 -> 0; e1 only m2 -> -3
    close(merge("ties", [[1.0, 2.0], [-1.0, -3.0]], density=1.0), [0.0, -3.0])


def test_ties_one_input_density_one_is_task_arithmetic():
    # (with one input the disjoint mean divides its weight out, so the property holds at weight 1)
    tau = torch.randn(5, 7)
    torch.testing.assert_close(
        merge("ties", [tau], density=1.0, **{"lambda": 1.5}),
        merge("task_arithmetic", [tau], **{"lambda": 1.5}),
    )


def test_magnitude_topk_keeps_ties_at_threshold():
    # density 0.25 of 4: k = 1, the largest |tau| is 1.0, held by three entries: all three are kept.
    close(magnitude_topk(torch.tensor([1.0, -1.0, 1.0, 0.5]), 0.25), [1.0, -1.0, 1.0, 0.0])


def test_magnitude_topk_keeps_at_least_one():
    # density 0.01 of 10: round(0.1) = 0 -> at least 1 entry, the largest
    tau = torch.tensor([0.1, -0.9, 0.3, 0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert torch.count_nonzero(magnitude_topk(tau, 0.01)) == 1 and magnitude_topk(tau, 0.01)[1] == -0.9


# --- DARE ------------------------------------------------------------------------------------------------


def test_dare_drop_inverse_p_and_l1():
    tau = torch.tensor([1.0, 2.0, 3.0, 4.0])
    uniform = torch.tensor([0.1, 0.6, 0.3, 0.9])  # < 0.5 keeps entries 0 and 2
    close(dare_drop(tau, 0.5, "inverse_p", uniform), [2.0, 0.0, 6.0, 0.0])  # kept / 0.5
    close(dare_drop(tau, 0.5, "l1", uniform), [2.5, 0.0, 7.5, 0.0])  # kept L1 4 -> 10: factor 2.5
    close(dare_drop(tau, 0.05, "l1", uniform), [0.0, 0.0, 0.0, 0.0])  # nothing kept stays zero


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_density_one_is_task_arithmetic(name):
    tau = torch.randn(6, 4)
    expected = merge("task_arithmetic", [tau], **{"lambda": 2.0})
    torch.testing.assert_close(merge(name, [tau], density=1.0, **{"lambda": 2.0}), expected)


def test_dare_ties_density_one_is_sign_election():
    # sums [1 - 3, -2 - 1] -> [-, -]; e0 only m2: -3; e1 both: (-2 - 1) / 2
    close(merge("dare_ties", [[1.0, -2.0], [-3.0, -1.0]], density=1.0), [-3.0, -1.5])


def test_dare_keeps_about_p_and_rescales_survivors():
    tau = torch.randn(100, 100) + 5.0  # nonzero everywhere
    out = merge("dare_linear", [tau], density=0.3)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    torch.testing.assert_close(out[kept], tau[kept] / 0.3)


def test_dare_mask_is_a_pure_function_of_seed_name_index():
    tau = torch.ones(64, 64)
    first = merge("dare_linear", [tau, tau], seed=3, tensor="a")
    assert torch.equal(merge("dare_linear", [tau, tau], seed=3, tensor="a"), first)
    assert not torch.equal(merge("dare_linear", [tau, tau], seed=3, tensor="b"), first)
    assert not torch.equal(merge("dare_linear", [tau, tau], seed=4, tensor="a"), first)
    # the two models get different masks: their survivors are not all in the same places
    assert not torch.equal(merge("dare_linear", [tau], seed=3, tensor="a") * 2, first)


def test_uniform_like_depends_on_every_key_part():
    like = torch.empty(100)
    reference = uniform_like(like, 0, "w", 0)
    assert torch.equal(uniform_like(like, 0, "w", 0), reference)
    for other in [(1, "w", 0), (0, "v", 0), (0, "w", 1)]:
        assert not torch.equal(uniform_like(like, *other), reference)
    assert mask_key(0, "w", 0) < 2**64


def test_global_rng_untouched():
    tau = torch.randn(8, 8)
    state = torch.get_rng_state()
    merge("della", [tau], seed=1)
    assert torch.equal(torch.get_rng_state(), state)


# --- breadcrumbs -----------------------------------------------------------------------------------------


def test_breadcrumbs_band_hand_example():
    # 10 entries, density 0.5, gamma 0.2: drop top 2 (1.0, 0.9) and bottom round(0.3 * 10) = 3 (0.1, 0.2, 0.3)
    tau = torch.tensor([-0.1, 0.9, -0.4, 0.2, 1.0, -0.6, 0.3, 0.8, -0.5, 0.7])
    close(breadcrumbs_band(tau, 0.5, 0.2), [0.0, 0.0, -0.4, 0.0, 0.0, -0.6, 0.0, 0.8, -0.5, 0.7])


BREADCRUMB_DELTAS = [[0.5, -0.4, 0.3, -0.2, 0.1], [-0.1, 0.2, 0.6, 0.3, -0.5]]
# density 0.6, gamma 0.2 of 5: drop the top 1 and bottom 1 -> [0, -0.4, 0.3, -0.2, 0], [0, 0.2, 0, 0.3, -0.5]


def test_breadcrumbs_weighted_sum():
    # sum [0, -0.2, 0.3, 0.1, -0.5], times lambda 2
    close(
        merge("breadcrumbs", BREADCRUMB_DELTAS, density=0.6, gamma=0.2, **{"lambda": 2.0}),
        [0, -0.4, 0.6, 0.2, -1.0],
    )


def test_breadcrumbs_ties():
    # signs of the sum [0, -, +, +, -]: e0 -> 0; e1 m1 -0.4; e2 m1 0.3; e3 m2 0.3; e4 m2 -0.5
    close(merge("breadcrumbs_ties", BREADCRUMB_DELTAS, density=0.6, gamma=0.2), [0.0, -0.4, 0.3, 0.3, -0.5])


def test_breadcrumbs_full_band_is_task_arithmetic():
    tau = torch.randn(4, 4)
    torch.testing.assert_close(merge("breadcrumbs", [tau], density=1.0, gamma=0.0), tau)


# --- DELLA -----------------------------------------------------------------------------------------------


def test_row_ranks_per_row():
    # rank by |tau| within each row, 0 = smallest
    assert row_magnitude_ranks(torch.tensor([[3.0, 1.0, 2.0], [-5.0, 6.0, 0.0]])).tolist() == [
        [2, 0, 1],
        [1, 2, 0],
    ]


def test_della_drop_hand_example():
    # d 0.5, eps 0.15, n 4: p_r = 0.35 + 0.1 r. |tau| ranks [3, 0, 2, 1] -> p [0.65, 0.35, 0.55, 0.45]
    # uniform [0.6, 0.5, 0.56, 0.1] keeps entries 0 and 3: [0.4 / 0.65, 0, 0, -0.2 / 0.45]
    out = della_drop(torch.tensor([0.4, -0.1, 0.3, -0.2]), 0.5, 0.15, torch.tensor([0.6, 0.5, 0.56, 0.1]))
    close(out, [0.4 / 0.65, 0.0, 0.0, -0.2 / 0.45])


def test_della_single_entry_rows_use_density():
    # n = 1: p = d = 0.5; uniform 0.4 keeps (2 / 0.5 = 4), 0.7 drops
    close(della_drop(torch.tensor([[2.0], [3.0]]), 0.5, 0.15, torch.tensor([[0.4], [0.7]])), [[4.0], [0.0]])


def test_della_linear_without_spread_is_dare_linear():
    # eps = 0 gives p = d everywhere, and both draw the same numbers for (seed, name, index)
    deltas = [torch.randn(8, 8), torch.randn(8, 8)]
    torch.testing.assert_close(
        merge("della_linear", deltas, density=0.4, epsilon=0.0), merge("dare_linear", deltas, density=0.4)
    )


def test_della_density_one_epsilon_zero_is_ties_without_trim():
    deltas = [[1.0, -2.0], [-3.0, -1.0]]
    torch.testing.assert_close(
        merge("della", deltas, density=1.0, epsilon=0.0), merge("ties", deltas, density=1.0)
    )


def test_della_keeps_large_magnitudes_more_often():
    tau = torch.arange(1.0, 101.0).repeat(200, 1)  # every row ranks the same way
    kept = (merge("della_linear", [tau], density=0.5, epsilon=0.4) != 0).float().mean(dim=0)
    assert kept[:10].mean() < 0.2 and kept[-10:].mean() > 0.8  # p goes from 0.1 to 0.9
