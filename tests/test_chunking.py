"""Large tensors merged in row chunks give exactly the bytes of whole-tensor merges, for every method that
allows chunking, and random masks do not depend on how a tensor is cut."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distmerge import merge_core
from distmerge.merge import run_merge
from distmerge.methods import get_method, method_names, rng
from distmerge.options import RunOptions
from distmerge.recipe import parse_recipe

PARAMS = {"ties": {"trim_scope": "global"}, "dare_linear": {"rescale": "inverse_p"}}


def run(family: dict, method: str, out: Path) -> dict[str, bytes]:
    recipe = parse_recipe({"base": family["base"], "method": method, "output": str(out), "seed": 5,
                           "params": PARAMS.get(method, {}),
                           "models": [{"name": n, "path": family[n]} for n in ("sft-a", "sft-b", "rl-c")]})
    run_merge(recipe, RunOptions(progress=False, block_size=96 * 1024))
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".safetensors"}


def chunkable() -> list[str]:
    out = []
    for name in method_names():
        method = get_method(name)
        if method.chunking(method.parse_params(PARAMS.get(name, {}))) != "none":
            out.append(name)
    return out


def test_the_methods_that_should_chunk_do():
    assert set(chunkable()) == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "della",
                                "della_linear", "ram", "ram_plus"}


@pytest.mark.parametrize("method", chunkable())
def test_row_chunks_give_identical_bytes(method, tiny_family, tmp_path, monkeypatch):
    monkeypatch.setattr(rng, "SEGMENT", 1000)  # several RNG segments per tensor, cut across chunk edges
    whole = run(tiny_family, method, tmp_path / "whole")
    monkeypatch.setattr(merge_core, "CHUNK_ELEMENTS", 700)  # every 2-D tensor of the tiny model is chunked
    assert run(tiny_family, method, tmp_path / "chunked") == whole


def test_uniform_numbers_depend_only_on_position(monkeypatch):
    monkeypatch.setattr(rng, "SEGMENT", 64)
    tensor = torch.empty(10, 37)
    whole = rng.uniform_like(tensor, 1, "w", 0)
    pieces = [rng.uniform_like(torch.empty(rows, 37), 1, "w", 0, offset=start * 37, total=370)
              for start, rows in ((0, 3), (3, 4), (7, 3))]
    assert torch.equal(torch.cat(pieces), whole)
    assert not torch.equal(rng.uniform_like(tensor, 1, "w", 1), whole)
