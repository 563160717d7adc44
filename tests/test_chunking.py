"""Large tensors merged in row chunks give exactly the bytes of whole-tensor merges, for every method that
allows chunking (per-tensor statistics included: TIES top-k, breadcrumbs bands, DARE L1 norms, per-tensor RAM+
counts), random masks do not depend on how a tensor is cut, and blocks merged on several threads give the same
bytes. (Torch intra-op thread counts: tests/test_exact_selection.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distmerge import merge_core
from distmerge.merge import run_merge
from distmerge.methods import get_method, method_names, rng
from distmerge.options import RunOptions
from distmerge.recipe import parse_recipe

# Every method with its default params, plus the variants that take another path through the executor.
CASES = [(name, {}) for name in method_names()] + [
    ("ties", {"trim_scope": "global"}),
    ("dare_linear", {"rescale": "l1"}),
    ("dare_ties", {"rescale": "l1"}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.2}),
]


def case_id(case) -> str:
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


def run(family: dict, method: str, params: dict, out: Path, threads: int = 1,
        block_size: int = 96 * 1024) -> dict[str, bytes]:
    recipe = parse_recipe({"base": family["base"], "method": method, "output": str(out), "seed": 5,
                           "params": params,
                           "models": [{"name": n, "path": family[n]} for n in ("sft-a", "sft-b", "rl-c")]})
    run_merge(recipe, RunOptions(progress=False, block_size=block_size, threads_per_worker=threads))
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}


def chunkable(name: str, params: dict) -> bool:
    method = get_method(name)
    return method.chunking(method.parse_params(params)) != "none"


def test_every_method_but_model_stock_chunks():
    # Model Stock's float cosines have no exact additive form: it merges whole tensors.
    assert {name for name, params in CASES if not chunkable(name, params)} == {"model_stock"}


@pytest.mark.parametrize("case", [c for c in CASES if chunkable(*c)], ids=case_id)
@pytest.mark.parametrize("family_name", ["tiny_family", "bf16_family"])
def test_row_chunks_give_identical_bytes(case, family_name, request, tmp_path, monkeypatch):
    family = request.getfixturevalue(family_name)
    whole = run(family, *case, tmp_path / "whole")
    monkeypatch.setattr(merge_core, "CHUNK_ELEMENTS", 700)  # every 2-D tensor of the tiny model is chunked
    assert run(family, *case, tmp_path / "chunked") == whole


@pytest.mark.parametrize("case", [("ties", {"trim_scope": "global"}), ("dare_ties", {"rescale": "l1"}),
                                  ("breadcrumbs", {}), ("ram_plus", {})], ids=case_id)
def test_blocks_merged_on_threads_give_identical_bytes(case, bf16_family, tmp_path):
    """A worker merges several blocks at once, one per thread; statistics passes included."""
    one = run(bf16_family, *case, tmp_path / "one", block_size=16 * 1024)
    assert len(one) > 6
    assert run(bf16_family, *case, tmp_path / "threads", threads=3, block_size=16 * 1024) == one


def test_chunking_is_really_exercised(bf16_family, tmp_path, monkeypatch):
    """Sensitivity: the tensor phases run over chunks (a wrong chunk ranking would change the bytes)."""
    calls = []
    real = merge_core.chunked_tensor_stats
    monkeypatch.setattr(merge_core, "chunked_tensor_stats", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(merge_core, "CHUNK_ELEMENTS", 700)
    run(bf16_family, "breadcrumbs", {}, tmp_path / "out")
    assert calls


def test_uniform_numbers_depend_only_on_position():
    tensor = torch.empty(10, 37)
    whole = rng.uniform_like(tensor, 1, "w", 0)
    pieces = [rng.uniform_like(torch.empty(rows, 37), 1, "w", 0, offset=start * 37)
              for start, rows in ((0, 3), (3, 4), (7, 3))]
    assert torch.equal(torch.cat(pieces), whole)
    assert not torch.equal(rng.uniform_like(tensor, 1, "w", 1), whole)


def test_draws_are_reused_only_inside_the_scope():
    tensor = torch.empty(6, 5)
    outside = rng.uniform_like(tensor, 1, "w", 0)
    with rng.reusing_draws("w"):
        first = rng.uniform_like(tensor, 1, "w", 0)
        assert rng.uniform_like(tensor, 1, "w", 0) is first
        assert torch.equal(first, outside)  # the same numbers as a fresh draw
        other = rng.uniform_like(tensor, 1, "w", 0, offset=30)
        assert other is not first and not torch.equal(other, first)
        stranger = rng.uniform_like(tensor, 1, "v", 0)
        assert rng.uniform_like(tensor, 1, "v", 0) is not stranger  # only the scope's tensor is kept
        with rng.reusing_draws("w"):
            assert rng.uniform_like(tensor, 1, "w", 0) is not first  # an inner scope starts empty
        assert rng.uniform_like(tensor, 1, "w", 0) is first  # and the outer one is back
    assert rng.uniform_like(tensor, 1, "w", 0) is not first
    assert getattr(rng._scope, "draws", None) is None  # nothing is held after the scope


def test_l1_statistics_pass_reuses_the_merge_draws(bf16_family, tmp_path, monkeypatch):
    """On the torch path, DARE's L1 pass over a chunked tensor whose inputs are held draws no number twice: it
    costs as many draws as DARE without a statistics pass. (The kernels draw numbers inside their loops.)"""
    calls = []
    real = rng.stream_numbers
    monkeypatch.setattr(rng, "stream_numbers", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setenv("DISTMERGE_KERNELS", "torch")
    monkeypatch.setattr(merge_core, "CHUNK_ELEMENTS", 700)
    run(bf16_family, "dare_ties", {"rescale": "inverse_p"}, tmp_path / "one-pass")
    one_pass, calls[:] = list(calls), []
    run(bf16_family, "dare_ties", {"rescale": "l1"}, tmp_path / "two-pass")
    assert calls and sorted(calls) == sorted(one_pass)
    monkeypatch.setattr(merge_core, "TENSOR_CACHE_BYTES", 0)  # inputs not held: numbers drawn per pass
    calls[:] = []
    run(bf16_family, "dare_ties", {"rescale": "l1"}, tmp_path / "uncached")
    assert len(calls) > len(one_pass)
