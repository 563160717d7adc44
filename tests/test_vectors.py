"""`distmerge vector extract` writes A - B (fp32) as a checkpoint-shaped artifact; `distmerge vector stats`
reports norms, sparsity and overlap per tensor kind, checked here against values computed independently."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from distmerge.cli import cli, main
from distmerge.errors import MergeError
from distmerge.vectors import vector_stats
from tests.conftest import build_tiny_model
from tests.merge_helpers import build_family, derive, finetune, load_checkpoint

MODELS = ("sft-a", "sft-b", "rl-c", "rl-d")


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    return build_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="module")
def extracted(family, tmp_path_factory) -> dict[str, str]:
    """Each model's vector (model - base), extracted through the CLI, in a folder named like the model."""
    root = tmp_path_factory.mktemp("vectors")
    out = {}
    for name in MODELS:
        result = CliRunner().invoke(cli, ["vector", "extract", family[name], family["base"], "--out",
                                          str(root / name)])
        assert result.exit_code == 0, result.output
        out[name] = str(root / name)
    return out


def kind(name: str) -> str:
    """Tensor kind of a Qwen2 tensor name, written independently of distmerge.architecture."""
    if name.endswith("embed_tokens.weight"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name:
        return "norm"
    return "attention" if ".self_attn." in name else "mlp"


def run_stats(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["vector", "stats", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def expected_stats(vecs: dict[str, dict[str, torch.Tensor]], eps: float = 1e-5) -> dict:
    per: dict = {}
    for vec_name, tensors in vecs.items():
        groups: dict[str, list[torch.Tensor]] = {}
        for name, t in tensors.items():
            groups.setdefault(kind(name), []).append(t.double().flatten())
            groups.setdefault("all", []).append(t.double().flatten())
        per[vec_name] = {}
        for k, parts in groups.items():
            flat = torch.cat(parts)
            per[vec_name][k] = {"numel": flat.numel(), "l1": float(flat.abs().sum()),
                                "l2": float(flat.square().sum().sqrt()),
                                "active_fraction": float((flat.abs() > eps).double().mean())}
    overlap = {}
    for a, b in itertools.combinations(vecs, 2):
        counts: dict[str, list[int]] = {}
        for name in vecs[a]:
            ma, mb = vecs[a][name].abs() > eps, vecs[b][name].abs() > eps
            for k in (kind(name), "all"):
                c = counts.setdefault(k, [0, 0])
                c[0] += int((ma & mb).sum())
                c[1] += int((ma | mb).sum())
        overlap[f"{a} vs {b}"] = {k: {"both": both, "either": either, "jaccard": both / either if either else 0.0}
                                  for k, (both, either) in counts.items()}
    return {"vectors": per, "overlap": overlap}


def assert_stats_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    assert got["vectors"].keys() == expected["vectors"].keys()
    for vec, kinds in expected["vectors"].items():
        assert got["vectors"][vec].keys() == kinds.keys(), vec
        for k, values in kinds.items():
            g = got["vectors"][vec][k]
            assert g["numel"] == values["numel"], (vec, k)
            for key in ("l1", "l2", "active_fraction"):
                assert g[key] == pytest.approx(values[key], rel=1e-9, abs=1e-12), (vec, k, key)
    assert got["overlap"].keys() == expected["overlap"].keys()
    for pair, kinds in expected["overlap"].items():
        assert got["overlap"][pair] == {k: {**v, "jaccard": pytest.approx(v["jaccard"], rel=1e-12)}
                                        for k, v in kinds.items()}, pair


# --- extract -------------------------------------------------------------------------------------------------


def test_extract_is_a_minus_b_in_fp32_with_the_same_names(family, extracted):
    base = load_checkpoint(family["base"], torch.float32)
    for name in MODELS:
        model = load_checkpoint(family[name], torch.float32)
        vector = load_checkpoint(extracted[name])
        assert sorted(vector) == sorted(base)
        for tensor_name, t in vector.items():
            assert t.dtype == torch.float32 and t.shape == base[tensor_name].shape
            assert torch.equal(t, model[tensor_name] - base[tensor_name]), (name, tensor_name)
        out = Path(extracted[name])
        assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
        provenance = json.loads((out / "distmerge_provenance.json").read_text())
        assert provenance["run"]["kind"] == "vector"


def test_extract_from_bf16_checkpoints_keeps_fp32_or_casts_on_request(tmp_path):
    base = build_tiny_model(tmp_path / "base", "qwen2", dtype=torch.bfloat16)
    # An RL-like update far below bf16 resolution relative to the weights survives only as exact differences.
    rl = finetune(base, tmp_path / "rl", seed=3, scale=1e-3, band=(0.0, 0.1))
    runner = CliRunner()
    for dtype, expected_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out = tmp_path / f"vec-{dtype}"
        result = runner.invoke(cli, ["vector", "extract", rl, base, "--out", str(out), "--dtype", dtype])
        assert result.exit_code == 0, result.output
        a, b, vec = load_checkpoint(rl, torch.float32), load_checkpoint(base, torch.float32), load_checkpoint(out)
        for name in b:
            assert vec[name].dtype == expected_dtype
            assert torch.equal(vec[name], (a[name] - b[name]).to(expected_dtype)), name
    # bf16 subtraction would lose the update: fp32 differences are the point of --dtype float32.
    a_bf16, b_bf16 = load_checkpoint(rl), load_checkpoint(base)
    fp32 = load_checkpoint(tmp_path / "vec-float32")
    assert any(not torch.equal((a_bf16[n] - b_bf16[n]).float(), fp32[n]) for n in fp32)


def test_extract_refuses_an_existing_output_unless_overwrite(family, extracted, tmp_path):
    runner = CliRunner()
    again = runner.invoke(cli, ["vector", "extract", family["sft-a"], family["base"], "--out", extracted["sft-a"]])
    assert again.exit_code != 0 and "already exists" in str(again.exception)
    out = tmp_path / "vec"
    for _ in range(2):
        result = runner.invoke(cli, ["vector", "extract", family["sft-b"], family["base"], "--out", str(out),
                                     "--overwrite"])
        assert result.exit_code == 0, result.output
    assert all(torch.equal(x, y) for x, y in zip(load_checkpoint(out).values(),
                                                 load_checkpoint(extracted["sft-b"]).values(), strict=True))


def test_extract_mismatch_names_the_tensor(family, tmp_path, capsys):
    broken = derive(family["sft-a"], tmp_path / "broken", lambda n, t: None if n == "model.norm.weight" else t)
    with pytest.raises(SystemExit) as info:
        main(["vector", "extract", broken, family["base"], "--out", str(tmp_path / "vec")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "tensor model.norm.weight is in base but not in vector" in err
    assert not (tmp_path / "vec").exists()


# --- stats ---------------------------------------------------------------------------------------------------


def test_stats_of_vectors_match_independent_values(extracted):
    got = run_stats(*(extracted[n] for n in MODELS))
    vecs = {n: load_checkpoint(extracted[n]) for n in MODELS}
    assert_stats_close(got, expected_stats(vecs))
    # The family's structure shows through: dense vectors overlap fully, disjoint sparse ones not at all.
    assert got["vectors"]["sft-a"]["all"]["active_fraction"] == 1.0
    assert got["vectors"]["rl-c"]["all"]["active_fraction"] == pytest.approx(0.05, abs=0.005)
    assert got["overlap"]["sft-a vs sft-b"]["all"]["jaccard"] == 1.0
    assert got["overlap"]["rl-c vs rl-d"]["all"]["both"] == 0
    assert set(got["vectors"]["sft-a"]) == {"embedding", "attention", "mlp", "norm", "lm_head", "all"}
    l2 = got["vectors"]["sft-a"]
    assert math.sqrt(sum(l2[k]["l2"] ** 2 for k in l2 if k != "all")) == pytest.approx(l2["all"]["l2"])


def test_stats_with_base_equal_stats_of_extracted_vectors(family, extracted):
    with_base = run_stats(*(family[n] for n in MODELS), "--base", family["base"])
    assert with_base == run_stats(*(extracted[n] for n in MODELS))


def test_stats_eps_sets_the_activity_threshold(extracted):
    got = run_stats(extracted["sft-a"], extracted["rl-c"], "--eps", "0.008")
    vecs = {n: load_checkpoint(extracted[n]) for n in ("sft-a", "rl-c")}
    assert_stats_close(got, expected_stats(vecs, eps=0.008))
    assert 0.0 < got["vectors"]["sft-a"]["all"]["active_fraction"] < 1.0


def test_stats_table_output(extracted):
    result = CliRunner().invoke(cli, ["vector", "stats", extracted["rl-c"], extracted["rl-d"]])
    assert result.exit_code == 0, result.output
    assert "rl-c" in result.output and "mlp" in result.output and "jaccard" in result.output


def test_stats_mismatched_names_are_an_error(extracted, tmp_path, capsys):
    broken = derive(extracted["sft-a"], tmp_path / "broken", lambda n, t: None if n == "lm_head.weight" else t)
    with pytest.raises(MergeError, match=r"tensor lm_head\.weight is in .* but not in .*broken"):
        vector_stats([extracted["sft-b"], broken])
    with pytest.raises(SystemExit) as info:
        main(["vector", "stats", extracted["sft-b"], broken, "--json"])
    assert info.value.code == 2 and "lm_head.weight" in capsys.readouterr().err


@pytest.mark.parametrize("with_base", [False, True])
def test_stats_mismatched_shapes_are_an_error_naming_the_tensor(family, extracted, tmp_path, with_base):
    """Library bug: vector_stats checks names only; a shape mismatch surfaces as a bare torch RuntimeError
    (or, for broadcastable shapes, silently wrong statistics)."""
    name = "model.layers.1.self_attn.q_proj.weight"
    src = family["sft-b"] if with_base else extracted["sft-b"]
    broken = derive(src, tmp_path / "broken", lambda n, t: t[:, :60] if n == name else t)
    urls = [family["sft-a"], broken] if with_base else [extracted["sft-a"], broken]
    with pytest.raises(MergeError, match=name.replace(".", r"\.")):
        vector_stats(urls, base=family["base"] if with_base else None)
