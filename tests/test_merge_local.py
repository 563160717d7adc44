"""Single-process merges of tiny real checkpoints, checked against formulas computed here on the tensors on disk.

Every registered method produces a checkpoint that transformers loads and generates from; task arithmetic,
linear, TIES, RAM/RAM+, model stock, breadcrumbs, LiNeS and vector transfer are compared with independent
implementations; then determinism, provenance, the commit protocol, the CLI and remote storage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from distmerge.cli import cli, main
from distmerge.errors import CheckpointError, MergeError, RecipeError
from distmerge.merge import run_merge
from distmerge.methods import method_names, rng
from distmerge.options import RunOptions
from distmerge.recipe import parse_recipe
from tests.conftest import build_tiny_model, upload
from tests.merge_helpers import (
    build_family,
    derive,
    finetune,
    generate,
    load_checkpoint,
    shard_bytes,
    vectors,
    write_like,
)

SMALL_BLOCK = 64 * 1024  # several blocks (shards) from the tiny model
GOLDEN_LINES = [0.5, 2 / 3, 5 / 6, 1.0]  # algorithms.md: L = 4, alpha = beta = 0.5
NON_BLOCK = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    return build_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory) -> dict[str, str]:
    return build_family(tmp_path_factory.mktemp("family-bf16"), dtype=torch.bfloat16)


def recipe(family, out, method="task_arithmetic", models=("sft-a", "sft-b"), weights=None, **fields):
    refs = [{"name": n, "path": family[n], **({"weight": weights[i]} if weights else {})}
            for i, n in enumerate(models)]
    return parse_recipe({"base": family["base"], "models": refs, "method": method, "output": str(out), **fields})


def merge(family, out, method="task_arithmetic", models=("sft-a", "sft-b"), options=None, **fields) -> dict:
    options = RunOptions(workers=0, progress=False, **(options or {}))
    run_merge(recipe(family, out, method, models, **fields), options)
    return load_checkpoint(out)


def assert_same(got: dict, expected: dict, atol: float = 0.0) -> None:
    """Same names and dtypes; values bit-identical, or within `atol` where the reference orders its float
    operations differently from the library (parameter space instead of delta space, float64 cosines)."""
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        if atol == 0.0:
            assert torch.equal(got[name], expected[name]), name
        else:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol, msg=name)


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


# --- every method ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", method_names())
def test_every_method_gives_a_loadable_generating_checkpoint(family, tmp_path, method):
    out = tmp_path / method
    got = merge(family, out, method, models=("sft-a", "sft-b", "rl-c"))
    base = load_checkpoint(family["base"])
    assert {n: (t.shape, t.dtype) for n, t in got.items()} == {n: (t.shape, t.dtype) for n, t in base.items()}
    assert all(torch.isfinite(t).all() for t in got.values())
    assert any(not torch.equal(got[n], base[n]) for n in base), "the merge changed nothing"
    generate(out)


# --- formulas ----------------------------------------------------------------------------------------------


def test_task_arithmetic_is_base_plus_lambda_weighted_sum(family, tmp_path):
    theta0, (tau_a, tau_b) = vectors(family, ["sft-a", "sft-b"])
    got = merge(family, tmp_path / "out", weights=[1.0, 0.5], params={"lambda": 0.7})
    assert_same(got, {n: theta0[n] + (tau_a[n] + 0.5 * tau_b[n]) * 0.7 for n in theta0})


def test_linear_is_the_weighted_average_of_models(family, tmp_path):
    a, b = load_checkpoint(family["sft-a"]), load_checkpoint(family["sft-b"])
    got = merge(family, tmp_path / "out", "linear", weights=[3.0, 1.0])
    assert_same(got, {n: (3 * a[n] + b[n]) / 4 for n in a}, atol=3e-7)  # ~2 ulp at norm weights ~1


def test_linear_of_identical_models_is_that_model(family, tmp_path):
    fam = {**family, "copy": family["sft-a"]}
    got = merge(fam, tmp_path / "out", "linear", models=("sft-a", "copy"), weights=[2.0, 5.0])
    assert_same(got, load_checkpoint(family["sft-a"]), atol=1e-8)  # delta form: (2 tau + 5 tau) / 7 ~ tau


def ties_reference(taus: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES from the paper: top-k by |tau| per tensor, elect sgn(sum w tau), mean over agreeing entries."""
    trimmed = []
    for tau in taus:
        k = max(1, round(density * tau.numel()))
        threshold = tau.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(tau.abs() >= threshold, tau, 0.0))
    elected = torch.sign(sum(w * t for w, t in zip(weights, trimmed, strict=True)))
    agree = [(t != 0) & (torch.sign(t) == elected) for t in trimmed]
    numerator = sum(w * torch.where(m, t, 0.0) for w, m, t in zip(weights, agree, trimmed, strict=True))
    denominator = sum(w * m.float() for w, m in zip(weights, agree, strict=True))
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-30), 0.0)


def test_ties_with_one_input_and_density_one_is_task_arithmetic(family, tmp_path):
    ties = merge(family, tmp_path / "ties", "ties", models=("sft-a",), params={"density": 1.0, "lambda": 0.8})
    ta = merge(family, tmp_path / "ta", models=("sft-a",), params={"lambda": 0.8})
    assert_same(ties, ta)


def test_ties_matches_the_paper_formula(family, tmp_path):
    theta0, taus = vectors(family, ["sft-a", "sft-b", "rl-c"])
    got = merge(family, tmp_path / "out", "ties", models=("sft-a", "sft-b", "rl-c"), weights=[1.0, 2.0, 1.0],
                params={"density": 0.3, "lambda": 1.5})
    expected = {n: theta0[n] + 1.5 * ties_reference([t[n] for t in taus], [1.0, 2.0, 1.0], 0.3) for n in theta0}
    assert_same(got, expected, atol=0.0)


def test_ram_on_disjoint_sparse_supports_is_the_sum_of_vectors(family, tmp_path):
    theta0, (tau_c, tau_d) = vectors(family, ["rl-c", "rl-d"])
    assert not any(((tau_c[n] != 0) & (tau_d[n] != 0)).any() for n in theta0), "supports must be disjoint"
    expected = {n: theta0[n] + (tau_c[n] + tau_d[n]) for n in theta0}
    assert_same(merge(family, tmp_path / "ram", "ram", models=("rl-c", "rl-d")), expected)
    # No shared entries: S_i = 0, so rho_i = 0 and RAM+ is RAM.
    assert_same(merge(family, tmp_path / "plus", "ram_plus", models=("rl-c", "rl-d")), expected)


def test_ram_plus_lambdas_come_from_whole_checkpoint_counts(family, tmp_path):
    theta0, (tau_a, tau_c) = vectors(family, ["sft-a", "rl-c"])
    active_a = {n: tau_a[n].abs() > 1e-5 for n in theta0}
    active_c = {n: tau_c[n].abs() > 1e-5 for n in theta0}
    shared = sum(int((active_a[n] & active_c[n]).sum()) for n in theta0)
    unique_a = sum(int((active_a[n] & ~active_c[n]).sum()) for n in theta0)
    unique_c = sum(int((active_c[n] & ~active_a[n]).sum()) for n in theta0)
    assert shared > 0 and unique_a > 0 and unique_c == 0  # rl-c lies inside dense sft-a: the U = 0 edge case
    lam_a, lam_c = 1 + 0.5 * min(1.0, shared / unique_a), 1 + 0.5 * 1.0
    out = tmp_path / "out"
    got = merge(family, out, "ram_plus", models=("sft-a", "rl-c"), params={"rescale_factor": 1.5})
    stats = json.loads((out / "distmerge_provenance.json").read_text())["statistics"]
    assert stats["ram_plus_lambdas"] == pytest.approx([lam_a, lam_c], rel=1e-12)
    expected = {}
    for n in theta0:
        both = active_a[n] & active_c[n]
        unique = torch.where(active_a[n], lam_a * tau_a[n], torch.where(active_c[n], lam_c * tau_c[n], 0.0))
        delta = torch.where(both, (tau_a[n] + tau_c[n]) / 2, unique)
        expected[n] = theta0[n] + delta
    assert_same(got, expected, atol=0.0)


def test_model_stock_matches_the_paper_formula(family, tmp_path):
    theta0, taus = vectors(family, ["sft-a", "sft-b", "rl-c"])
    got = merge(family, tmp_path / "out", "model_stock", models=("sft-a", "sft-b", "rl-c"))
    expected = {}
    for n in theta0:
        flat = [t[n].flatten().double() for t in taus]
        pairs = [(0, 1), (0, 2), (1, 2)]
        norms = [float(f.norm()) for f in flat]  # a zero vector (rl-c misses small tensors) has cosine 0
        cos = sum(float(flat[i] @ flat[j]) / (norms[i] * norms[j]) if norms[i] * norms[j] else 0.0
                  for i, j in pairs) / 3
        t = 3 * cos / (1 + 2 * cos)
        mean = sum(x[n] for x in taus) / 3
        expected[n] = t * (theta0[n] + mean) + (1 - t) * theta0[n]
    assert_same(got, expected, atol=1e-6)  # float64 cosines here


def test_breadcrumbs_drops_outliers_and_small_entries(family, tmp_path):
    theta0, (tau,) = vectors(family, ["sft-a"])
    got = merge(family, tmp_path / "out", "breadcrumbs", models=("sft-a",),
                params={"density": 0.6, "gamma": 0.1, "lambda": 1.0})
    for n in theta0:
        magnitudes = tau[n].abs().flatten().sort(descending=True).values
        numel = magnitudes.numel()
        top, keep = round(0.1 * numel), numel - round(0.1 * numel) - round(0.3 * numel)
        high, low = magnitudes[top], magnitudes[top + keep - 1]  # the band kept: [low, high]
        band = (tau[n].abs() <= high) & (tau[n].abs() >= low)
        torch.testing.assert_close(got[n], theta0[n] + torch.where(band, tau[n], 0.0), rtol=0, atol=2e-6)


def test_dare_keeps_a_density_fraction_rescaled_by_inverse_p(family, tmp_path):
    theta0, (tau,) = vectors(family, ["sft-a"])
    got = merge(family, tmp_path / "out", "dare_linear", models=("sft-a",), params={"density": 0.3}, seed=5)
    kept = total = 0
    for n in theta0:
        delta = got[n] - theta0[n]
        nonzero = delta != 0
        torch.testing.assert_close(delta[nonzero], tau[n][nonzero] / 0.3, rtol=1e-5, atol=1e-6)
        kept, total = kept + int(nonzero.sum()), total + delta.numel()
    assert kept / total == pytest.approx(0.3, abs=0.01)


# --- LiNeS -------------------------------------------------------------------------------------------------


def test_lines_golden_schedule_per_layer(family, tmp_path):
    theta0, (tau,) = vectors(family, ["sft-a"])
    got = merge(family, tmp_path / "out", models=("sft-a",), schedule={"alpha": 0.5, "beta": 0.5})
    seen = set()
    for n in theta0:
        layer = layer_of(n)
        scale = 0.5 if layer is None else GOLDEN_LINES[layer]  # non_block defaults to alpha
        torch.testing.assert_close(got[n], theta0[n] + tau[n] * scale, rtol=0, atol=1e-7)
        # The realised per-layer scale, read back from the real tensors.
        big = tau[n].abs() > 1e-3
        ratio = ((got[n] - theta0[n])[big] / tau[n][big]).median().item()
        assert round(ratio, 3) == round(scale, 3), (n, ratio)
        seen.add(layer)
    assert seen == {None, 0, 1, 2, 3}
    assert [round(x, 3) for x in GOLDEN_LINES] == [0.5, 0.667, 0.833, 1.0]


def test_lines_alpha_one_beta_zero_is_the_identity(family, tmp_path):
    plain = merge(family, tmp_path / "plain", "ties")
    scheduled = merge(family, tmp_path / "lines", "ties", schedule={"alpha": 1.0, "beta": 0.0})
    assert_same(scheduled, plain)


@pytest.mark.parametrize("non_block,scale", [("alpha", 0.25), ("one", 1.0), ("zero", 0.0)])
def test_lines_non_block_choice(family, tmp_path, non_block, scale):
    theta0, (tau,) = vectors(family, ["sft-a"])
    out = tmp_path / "out"
    got = merge(family, out, models=("sft-a",), schedule={"alpha": 0.25, "beta": 0.5, "non_block": non_block})
    for n in NON_BLOCK:
        assert torch.equal(got[n], theta0[n] + tau[n] * scale), n
    first_block = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[first_block], theta0[first_block] + tau[first_block] * 0.25)
    recorded = json.loads((out / "distmerge_provenance.json").read_text())["recipe"]["schedule"]
    assert recorded == {"type": "lines", "alpha": 0.25, "beta": 0.5, "non_block": non_block}


def test_lines_auto_alpha_is_recorded_and_applied(family, tmp_path):
    theta0, taus = vectors(family, ["sft-a", "sft-b"])
    merged = {n: ties_reference([t[n] for t in taus], [1.0, 1.0], 0.2) for n in theta0}
    sum_l1 = sum(float((taus[0][n] + taus[1][n]).abs().double().sum()) for n in theta0)
    merged_l1 = sum(float(merged[n].abs().double().sum()) for n in theta0)
    alpha = sum_l1 / merged_l1 / 2
    out = tmp_path / "out"
    got = merge(family, out, "ties", schedule={"alpha": "auto", "beta": 0.5})
    provenance = json.loads((out / "distmerge_provenance.json").read_text())
    assert provenance["recipe"]["schedule"]["alpha"] == "auto"
    assert provenance["statistics"]["lines_alpha"] == pytest.approx(alpha, rel=1e-5)
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight", "lm_head.weight"):
        scale = alpha + (0.5 if layer_of(n) == 3 else 0.0)
        torch.testing.assert_close(got[n], theta0[n] + merged[n] * scale, rtol=0, atol=2e-6)


# --- transfer, dtypes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, -1.0])
def test_reasoning_vector_transfer_onto_a_target(family, tmp_path, scale):
    sft, grpo, other = (load_checkpoint(family[n]) for n in ("sft-a", "grpo", "other"))
    out = tmp_path / "out"
    run_merge(parse_recipe({"base": family["sft-a"], "models": [{"name": "grpo", "path": family["grpo"]}],
                            "target": family["other"], "method": "task_arithmetic", "params": {"lambda": scale},
                            "output": str(out)}), RunOptions(progress=False))
    assert_same(load_checkpoint(out), {n: other[n] + (grpo[n] - sft[n]) * scale for n in other})
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads(Path(family["other"], "config.json").read_text())
    generate(out)


def test_bf16_inputs_are_merged_in_fp32(bf16_family, tmp_path):
    theta0, (tau_a, tau_b) = vectors(bf16_family, ["sft-a", "sft-b"])
    got = merge(bf16_family, tmp_path / "out", params={"lambda": 0.3})
    expected = {n: (theta0[n] + (tau_a[n] + tau_b[n]) * 0.3).to(torch.bfloat16) for n in theta0}
    assert_same(got, expected)
    # The same formula evaluated in bf16 differs: the check above really pins fp32 computation.
    base, a, b = (load_checkpoint(bf16_family[n]) for n in ("base", "sft-a", "sft-b"))
    in_bf16 = {n: base[n] + ((a[n] - base[n]) + (b[n] - base[n])) * 0.3 for n in base}
    assert any(not torch.equal(in_bf16[n], expected[n]) for n in base)
    generate(tmp_path / "out")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_output_dtype_override(family, tmp_path, dtype):
    theta0, (tau_a, tau_b) = vectors(family, ["sft-a", "sft-b"])
    out = tmp_path / "out"
    got = merge(family, out, dtype=dtype)
    assert_same(got, {n: (theta0[n] + (tau_a[n] + tau_b[n])).to(getattr(torch, dtype)) for n in theta0})
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    generate(out)


# --- mismatched inputs -------------------------------------------------------------------------------------

MISMATCHES = {
    "missing": (lambda n, t: None if n == "model.layers.2.mlp.up_proj.weight" else t,
                r"tensor model\.layers\.2\.mlp\.up_proj\.weight is in base but not in broken"),
    "extra": (lambda n, t: t, r"tensor model\.layers\.9\.extra\.weight is in broken but not in base"),
    "shape": (lambda n, t: t[:, :60] if n == "model.layers.1.self_attn.q_proj.weight" else t,
              r"tensor model\.layers\.1\.self_attn\.q_proj\.weight has shape \[64, 64\] in base but \[64, 60\] "
              r"in broken"),
    "dtype": (lambda n, t: t.to(torch.bfloat16) if n == "model.norm.weight" else t,
              r"tensor model\.norm\.weight has dtype F32 in base but BF16 in broken"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_mismatched_inputs_name_the_tensor_and_models_and_write_nothing(family, tmp_path, case):
    edit, pattern = MISMATCHES[case]
    broken = derive(family["sft-b"], tmp_path / "broken", edit)
    if case == "extra":
        from safetensors.torch import save_file

        save_file({"model.layers.9.extra.weight": torch.zeros(2)}, f"{broken}/extra.safetensors")
        index = json.loads(Path(broken, "model.safetensors.index.json").read_text())
        index["weight_map"]["model.layers.9.extra.weight"] = "extra.safetensors"
        Path(broken, "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=pattern):
        merge({**family, "broken": broken}, out, models=("sft-a", "broken"))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no staging prefix either


def test_mismatched_target_is_named(family, tmp_path):
    target = derive(family["other"], tmp_path / "target", lambda n, t: t[:10] if n == "lm_head.weight" else t)
    pattern = r"tensor lm_head\.weight has shape \[96, 64\] in base but \[10, 64\] in target"
    with pytest.raises(MergeError, match=pattern):
        merge(family, tmp_path / "out", target=target)
    assert not (tmp_path / "out").exists()


# --- determinism -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dare_ties", "ram_plus", "della"])
def test_same_recipe_twice_gives_byte_identical_shards(family, tmp_path, method):
    models = ("sft-a", "sft-b", "rl-c")
    merge(family, tmp_path / "one", method, models, options={"block_size": SMALL_BLOCK}, seed=3)
    merge(family, tmp_path / "two", method, models, options={"block_size": SMALL_BLOCK}, seed=3)
    first = shard_bytes(tmp_path / "one")
    assert len(first) > 1 and first == shard_bytes(tmp_path / "two")


def test_block_size_changes_shards_not_tensors(family, tmp_path):
    models = ("sft-a", "sft-b", "rl-c")
    schedule = {"alpha": "auto", "beta": 0.5}
    small = merge(family, tmp_path / "small", "ties", models, {"block_size": SMALL_BLOCK}, seed=1,
                  params={"trim_scope": "global"}, schedule=schedule)
    large = merge(family, tmp_path / "large", "ties", models, seed=1, params={"trim_scope": "global"},
                  schedule=schedule)
    assert len(shard_bytes(tmp_path / "small")) > 1 and len(shard_bytes(tmp_path / "large")) == 1
    assert_same(small, large)


def test_dare_seed_changes_the_output(family, tmp_path):
    one = merge(family, tmp_path / "one", "dare_ties", seed=1)
    two = merge(family, tmp_path / "two", "dare_ties", seed=2)
    assert all(not torch.equal(one[n], two[n]) for n in one)


# --- commit protocol, provenance ---------------------------------------------------------------------------


def test_provenance_model_card_index_and_no_staging(family, tmp_path):
    out = tmp_path / "out"
    merge(family, out, "ram_plus", options={"block_size": SMALL_BLOCK})
    provenance = json.loads((out / "distmerge_provenance.json").read_text())
    canonical = recipe(family, out, "ram_plus").canonical()
    assert provenance["recipe"] == canonical
    assert provenance["recipe"]["params"] == {"epsilon": 1e-5, "rescale_factor": 1.2}
    assert len(provenance["plan_hash"]) == 16
    assert set(provenance["inputs"]) == {"base", "target", "model:sft-a", "model:sft-b"}
    assert all(v["fingerprint"] and v["url"] for v in provenance["inputs"].values())
    assert {"torch", "safetensors", "transformers", "distmerge", "python"} <= set(provenance["versions"])
    assert provenance["versions"]["mask_stream"] == rng.STREAM  # which random masks a DARE/DELLA merge got
    assert len(provenance["statistics"]["ram_plus_lambdas"]) == 2
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "ram_plus" in card and provenance["plan_hash"] in card
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["distmerge_plan"] == provenance["plan_hash"]
    files = {p.name for p in out.iterdir()}
    assert set(index["weight_map"].values()) == {f for f in files if f.endswith(".safetensors")}
    assert sorted(index["weight_map"]) == sorted(load_checkpoint(family["base"]))
    assert {"config.json", "generation_config.json"} <= files
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the staging prefix is gone


def test_refuses_to_overwrite_without_the_option(family, tmp_path):
    out = tmp_path / "out"
    merge(family, out, options={"block_size": SMALL_BLOCK})
    before = shard_bytes(out)
    with pytest.raises(CheckpointError, match="already exists.*Fix: choose a new output URL or pass overwrite"):
        merge(family, out, params={"lambda": 0.5})
    assert shard_bytes(out) == before
    got = merge(family, out, params={"lambda": 0.5}, options={"overwrite": True})  # one shard replaces several
    theta0, (tau_a, tau_b) = vectors(family, ["sft-a", "sft-b"])
    assert_same(got, {n: theta0[n] + (tau_a[n] + tau_b[n]) * 0.5 for n in theta0})
    assert len(shard_bytes(out)) == 1


def test_linear_weights_summing_to_zero_are_a_recipe_error(family, tmp_path):
    """Library bug: the zero weight sum is only found mid-merge, as a bare ValueError that leaves staging."""
    with pytest.raises(RecipeError, match="weights"):
        recipe(family, tmp_path / "out", "linear", weights=[1.0, -1.0])


def test_output_spelled_differently_from_an_input_never_overwrites_it(family, tmp_path, monkeypatch):
    """Library bug: inputs are protected by comparing URL strings, so `file:///x` or a relative path naming
    the base passes both checks (recipe and writer) and, with overwrite, replaces the base checkpoint."""
    base = derive(family["base"], tmp_path / "base", lambda n, t: t)  # a private copy: the bug destroys it
    before = shard_bytes(base)
    monkeypatch.chdir(tmp_path)
    for spelling in (f"file://{base}", "base", f"{tmp_path}/./base"):
        with pytest.raises((RecipeError, CheckpointError), match="input"):
            run_merge(parse_recipe({"base": base, "models": [{"name": "a", "path": family["sft-a"]}],
                                    "method": "task_arithmetic", "output": spelling}),
                      RunOptions(progress=False, overwrite=True))
        assert shard_bytes(base) == before, f"output {spelling!r} overwrote the base"


def test_tied_embeddings_write_lm_head_from_the_embedding(tmp_path):
    """Llama with tie_word_embeddings: a stored lm_head is written as the merged embedding (one tensor)."""
    plain = build_tiny_model(tmp_path / "plain", "llama", dtype=torch.bfloat16, num_hidden_layers=4, shard="60KB")
    tensors = load_checkpoint(plain)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # stored, though tied
    base = write_like(plain, tmp_path / "base", tensors)
    fam = {"base": base, "a": finetune(base, tmp_path / "a", 1), "b": finetune(base, tmp_path / "b", 2)}
    out = tmp_path / "out"
    got = merge(fam, out, "ties", models=("a", "b"), schedule={"alpha": 0.5, "beta": 0.5})
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    assert not torch.equal(got["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    generate(out)


# --- CLI ---------------------------------------------------------------------------------------------------


def write_recipe(path: Path, family, out, method="ram_plus") -> str:
    path.write_text(yaml.safe_dump({"base": family["base"], "method": method, "output": str(out),
                                    "models": [{"name": n, "path": family[n]} for n in ("sft-a", "rl-c")]}))
    return str(path)


def test_cli_plan_then_merge(family, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", family, tmp_path / "out")
    runner = CliRunner()
    shown = runner.invoke(cli, ["plan", path, "--block-size", "64KiB"])
    assert shown.exit_code == 0, shown.output
    assert "statistics passes: ram_plus_overlap_counts" in shown.output and "block 1:" in shown.output
    as_json = runner.invoke(cli, ["plan", path, "--json"])
    plan_hash = json.loads(as_json.output)["plan_hash"]
    assert not (tmp_path / "out").exists()  # planning writes nothing

    merged = runner.invoke(cli, ["merge", path, "--no-progress"])
    assert merged.exit_code == 0, merged.output
    assert f"plan {plan_hash}" in merged.output and "published" in merged.output
    provenance = json.loads((tmp_path / "out" / "distmerge_provenance.json").read_text())
    assert provenance["plan_hash"] == plan_hash
    generate(tmp_path / "out")

    other = runner.invoke(cli, ["merge", path, "--no-progress", "--output", str(tmp_path / "other"),
                                "--block-size", "64KiB"])
    assert other.exit_code == 0, other.output
    assert_same(load_checkpoint(tmp_path / "other"), load_checkpoint(tmp_path / "out"))


def test_cli_methods_lists_every_method_with_params():
    shown = CliRunner().invoke(cli, ["methods"])
    assert shown.exit_code == 0
    for name in method_names():
        assert f"{name}:" in shown.output
    assert "lambda = 1.0" in shown.output and "rescale_factor = 1.2" in shown.output


def test_cli_existing_output_is_one_line_and_exit_2(family, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", family, tmp_path / "out")
    main(["merge", path, "--no-progress"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", path, "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already exists" in err and "Traceback" not in err


# --- remote storage ----------------------------------------------------------------------------------------


def download(url: str, options: dict, dest: Path) -> Path:
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    dest.mkdir(parents=True)
    for remote in fs.ls(url.removeprefix("s3://")):
        fs.get(remote, str(dest / remote.rsplit("/", 1)[-1]))
    return dest


@pytest.mark.parametrize("inputs", ["memory", "s3"])
def test_remote_inputs_to_s3_output(family, tmp_path, s3_bucket, inputs):
    bucket, options = s3_bucket
    root = f"memory://dm-merge-local-{tmp_path.name}" if inputs == "memory" else f"{bucket}/in"
    remote = {n: upload(family[n], f"{root}/{n}", options) for n in ("base", "sft-a", "rl-c")}
    spec = {"models": [{"name": n, "path": remote[n]} for n in ("sft-a", "rl-c")], "method": "ram_plus",
            "params": {"rescale_factor": 1.3}}
    run_merge(parse_recipe({**spec, "base": remote["base"], "output": f"{bucket}/merged",
                            "storage_options": options}), RunOptions(progress=False, block_size=SMALL_BLOCK))
    got = download(f"{bucket}/merged", options, tmp_path / "got")
    local = {**spec, "base": family["base"], "output": str(tmp_path / "local"),
             "models": [{"name": n, "path": family[n]} for n in ("sft-a", "rl-c")]}
    run_merge(parse_recipe(local), RunOptions(progress=False, block_size=SMALL_BLOCK))
    assert shard_bytes(got) == shard_bytes(tmp_path / "local")
    assert (got / "model.safetensors.index.json").exists() and (got / "distmerge_provenance.json").exists()
    generate(got)
