"""Production pieces that need no vLLM: specs, cron, sources and fingerprints, the lease (local and moto S3,
contended by threads), the ledger on moto, atomic promotion and gate decisions, scheduler no-op ticks,
the `runs` CLI and the job entrypoints' flags and dry run."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from distmerge.cli.runs_cmd import runs
from distmerge.errors import DistmergeError, RecipeError
from distmerge.evaluation import EvalReport, check_gates, resolve_roles
from distmerge.production import (
    Lease,
    Ledger,
    RunRecord,
    Runtime,
    Scheduler,
    load_spec,
    parse_spec,
    resolve_inputs,
)
from distmerge.production.cron import CronError, parse_cron
from distmerge.production.pipeline import LeaseLost, RunResult, conclude, template_hash
from distmerge.production.publish import POINTER_NAME, promote, read_pointer
from distmerge.production.scheduler import recipe_hash
from distmerge.storage import Location
from tests.conftest import upload

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "pipelines" / "specs"


def spec_data(base: str, sources: list, root: str, **extra) -> dict:
    return {"name": "unit", "merge": {"base": base, "sources": sources, "method": "task_arithmetic",
                                      "params": {"lambda": 0.5}},
            "evaluation": {"suites": ["testbed:reversal"], "n_per_task": 4},
            "gates": ["merged>=base"], "publish": {"root": root}, **extra}


# -- spec ----------------------------------------------------------------------------------------------
def test_example_specs_are_valid():
    one_shot, scheduled = load_spec(SPECS / "merge_eval_publish.yaml"), load_spec(SPECS / "scheduled.yaml")
    assert one_shot.ledger_url == "runs/production/testbed-ta/ledger" and one_shot.schedule is None
    assert one_shot.evaluation.engine.kv_cache_size == 256 << 20
    assert scheduled.merge.sources[0].is_glob and scheduled.schedule.interval_seconds == 300
    assert scheduled.lease_url == "runs/production/agents/lease"
    assert scheduled.evaluation.options("auto").num_actors == 1


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["merge"].update(method="tis"), "field merge.method: unknown method 'tis'"),
    (lambda d: d.update(gates=["merged>0.9*base"]), "field gates: cannot parse gate 'merged>0.9*base'"),
    (lambda d: d.update(schedule={"interval_seconds": 5, "cron": "* * * * *"}), "give exactly one of"),
    (lambda d: d.update(schedule={"cron": "* * *"}), "has 3 fields; write 5"),
    (lambda d: d.update(run={"block_size": "12 parsecs"}), "field run: block_size: '12 parsecs' is not a size"),
    (lambda d: d["evaluation"].update(engine={"num_actors": 3}), "set evaluation.actors only"),
    (lambda d: d["evaluation"].update(suites=["testbed:nope"]), "unknown task 'nope'"),
    (lambda d: d["merge"].update(sources=[{"url": "s3://b/a/*/", "name": "x"}]), "remove name 'x'"),
    (lambda d: d["merge"].update(params={"lambda": "big"}), "field params.lambda"),
    (lambda d: d.pop("publish"), "field publish: Field required; add it to the spec"),
    (lambda d: d["run"].update(wrkers=2), "field run.wrkers: Extra inputs are not permitted (got 2)"),
])
def test_spec_errors_name_field_value_and_fix(edit, message):
    data = spec_data("b", ["m"], "out", run={"workers": 1})
    edited = copy.deepcopy(data)
    edit(edited)
    with pytest.raises(RecipeError) as failure:
        parse_spec(edited, "spec.yaml")
    assert message in str(failure.value) and str(failure.value).startswith("spec.yaml: ")
    assert parse_spec(data).run.workers == 1


def test_spec_sizes_and_schedules():
    spec = parse_spec(spec_data("b", ["m"], "out", run={"block_size": "1MiB"},
                                schedule={"cron": "*/15 * * * *"}))
    assert spec.run.block_size == 1 << 20 and spec.schedule.parsed_cron().minutes == {0, 15, 30, 45}


def test_cron_next_fire_times():
    now = dt.datetime(2025, 1, 1, 12, 7, 30, tzinfo=dt.UTC)  # a Wednesday
    assert parse_cron("*/15 * * * *").next_after(now) == now.replace(minute=15, second=0)
    assert parse_cron("0 3 * * 1").next_after(now) == dt.datetime(2025, 1, 6, 3, 0, tzinfo=dt.UTC)
    assert parse_cron("0 0 29 2 *").next_after(now) == dt.datetime(2028, 2, 29, tzinfo=dt.UTC)
    # Both day fields restricted: either matches (Friday the 3rd comes before the 15th).
    assert parse_cron("30 4 15 * 5").next_after(now) == dt.datetime(2025, 1, 3, 4, 30, tzinfo=dt.UTC)
    with pytest.raises(CronError, match="never fires"):
        parse_cron("0 0 30 2 *").next_after(now)
    with pytest.raises(CronError, match="minute field '61' is outside 0-59"):
        parse_cron("61 * * * *")


# -- sources and fingerprints --------------------------------------------------------------------------
@pytest.fixture
def agents_s3(s3_bucket, tiny_family):
    """base + agents/sft-a, agents/sft-b on moto, and agents/partial whose index names a missing shard."""
    url, options = s3_bucket
    upload(tiny_family["base"], f"{url}/models/base", options)
    for name in ("sft-a", "sft-b"):
        upload(tiny_family[name], f"{url}/agents/{name}", options)
    partial, source = Location(f"{url}/agents/partial", options), Location(tiny_family["rl-c"])
    shards = sorted(name for name in source.list() if name.endswith(".safetensors"))
    for name in sorted(source.list()):
        if name != shards[1]:  # the second shard is "still uploading"
            partial.child(name).write_bytes(source.child(name).read_bytes())
    return url, options


def test_sources_glob_ready_checkpoints_and_wait_for_incomplete_ones(agents_s3):
    url, options = agents_s3
    assert "model.safetensors.index.json" in Location(f"{url}/agents/partial", options).list()
    spec = parse_spec(spec_data(f"{url}/models/base", [f"{url}/agents/*/"], f"{url}/pub", storage_options=options))
    inputs = resolve_inputs(spec)
    assert [m.name for m in inputs.models] == ["sft-a", "sft-b"]
    assert inputs.models[0].url == f"{url}/agents/sft-a"
    assert list(inputs.waiting) == [f"{url}/agents/partial"] and "missing file" in inputs.waiting[f"{url}/agents/partial"]
    recipe = inputs.recipe(spec, f"{url}/pub/runs/x/model")
    assert [m.path for m in recipe.models] == [f"{url}/agents/sft-a", f"{url}/agents/sft-b"]
    marked = parse_spec({**spec.model_dump(), "merge": {**spec.merge.model_dump(), "ready_marker": "_SUCCESS"}})
    Location(f"{url}/agents/sft-b/_SUCCESS", options).write_bytes(b"")
    assert [m.name for m in resolve_inputs(marked).models] == ["sft-b"]


def test_fingerprints_change_when_a_file_changes_and_only_then(agents_s3):
    url, options = agents_s3
    spec = parse_spec(spec_data(f"{url}/models/base", [f"{url}/agents/*/"], f"{url}/pub", storage_options=options))
    first = resolve_inputs(spec)
    again = resolve_inputs(spec)
    assert again.fingerprints.digest == first.fingerprints.digest
    a_files = first.models[0].fingerprint["files"]
    assert a_files["config.json"]["etag"] and a_files["config.json"]["size"] > 0
    # Same size, same headers, other bytes: only the ETag tells, and it does.
    shard = Location(f"{url}/agents/sft-a/{sorted(n for n in a_files if n.endswith('.safetensors'))[0]}", options)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    changed = resolve_inputs(spec)
    assert changed.models[0].fingerprint["digest"] != first.models[0].fingerprint["digest"]
    assert changed.models[0].fingerprint["headers_sha256"] == first.models[0].fingerprint["headers_sha256"]
    assert changed.models[1].fingerprint == first.models[1].fingerprint
    assert changed.fingerprints.digest != first.fingerprints.digest


def test_local_fingerprints_follow_file_changes(tiny_family, tmp_path):
    agents = tmp_path / "agents"
    shutil.copytree(tiny_family["sft-a"], agents / "a")
    spec = parse_spec(spec_data(tiny_family["base"], [f"{agents}/*/"], str(tmp_path / "pub")))
    first = resolve_inputs(spec)
    assert resolve_inputs(spec).fingerprints == first.fingerprints
    config = agents / "a" / "config.json"
    config.write_text(config.read_text().replace("}", ', "note": 1}', 1))
    assert resolve_inputs(spec).fingerprints.digest != first.fingerprints.digest


# -- lease ---------------------------------------------------------------------------------------------
@pytest.fixture(params=["file", "s3"])
def lease_root(request, tmp_path) -> tuple[str, dict]:
    if request.param == "file":
        return str(tmp_path / "lease"), {}
    url, options = request.getfixturevalue("s3_bucket")
    return f"{url}/lease", options


def test_lease_acquire_contend_release_expire_take_over(lease_root):
    url, options = lease_root
    first, second = Lease(url, 60, options, owner="one"), Lease(url, 60, options, owner="two")
    assert first.acquire() and first.acquire()  # holding it already counts
    assert not second.acquire() and second.current().owner == "one"
    first.release()
    assert second.acquire() and not first.still_held()
    second.release()
    short = Lease(url, 1.5, options, owner="short")
    assert short.acquire() and not first.acquire()
    time.sleep(1.6)
    assert not short.still_held()
    assert first.acquire() and first.current().generation == 3  # took over the expired generation 2
    assert not short.renew() and short.held is None  # the old holder learns it lost the lease
    assert first.renew() and first.current().expires_at > time.time() + 50
    assert [n for n in Location(url, options).list() if not n.endswith(".json")] == []  # no temporary files


def test_a_running_holder_keeps_its_lease_alive(tmp_path):
    kept = Lease(str(tmp_path / "lease"), 3, owner="kept")
    assert kept.acquire()
    with kept.keep_alive():
        time.sleep(4.5)  # past the expiry: renewed every second in the background meanwhile
        assert kept.still_held() and not Lease(str(tmp_path / "lease"), 3).acquire()


def race(lease: Lease, barrier: threading.Barrier, wins: list[str]) -> None:
    barrier.wait()
    if lease.acquire():
        wins.append(lease.owner)


def test_two_schedulers_racing_for_the_lease_exactly_one_wins(lease_root):
    url, options = lease_root
    for round_number in range(3):
        leases = [Lease(url, 60, options, owner=f"racer-{i}") for i in range(4)]
        barrier, wins = threading.Barrier(len(leases)), []
        threads = [threading.Thread(target=race, args=(lease, barrier, wins)) for lease in leases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(wins) == 1, (round_number, wins)
        winner = next(lease for lease in leases if lease.owner == wins[0])
        assert winner.still_held() and winner.current().owner == wins[0]
        winner.release()


# -- ledger --------------------------------------------------------------------------------------------
def record(run_id: str, status: str, minute: int, fingerprints: str = "fp1", **extra) -> RunRecord:
    started = dt.datetime(2025, 1, 1, 12, minute, tzinfo=dt.UTC)
    metrics = {"accuracy": {"merged": {"uppercase": 0.75, "reversal": 0.0}}} if status == "published" else {}
    return RunRecord(run_id=run_id, pipeline="unit", started_at=started, finished_at=started + dt.timedelta(seconds=90),
                     status=status, recipe_hash="rh", fingerprint_set=fingerprints, merge_seconds=12.5,
                     eval_seconds=60.25, metrics=json.dumps(metrics), output_url=f"s3://b/runs/{run_id}/model", **extra)


@pytest.fixture
def ledger_s3(s3_bucket) -> tuple[str, dict, Ledger]:
    url, options = s3_bucket
    ledger = Ledger(f"{url}/ledger", options)
    assert ledger.read() == []
    ledger.append(record("20250101T120100Z-a", "failed", 1, error="MergeError: boom"))
    ledger.append(record("20250101T120500Z-b", "published", 5))
    ledger.append(record("20250101T120300Z-c", "gate_failed", 3, fingerprints="fp2"))
    return url, options, ledger


def test_ledger_append_read_filter(ledger_s3):
    url, options, ledger = ledger_s3
    rows = ledger.read()
    assert [r["run_id"] for r in rows] == ["20250101T120500Z-b", "20250101T120300Z-c", "20250101T120100Z-a"]
    assert rows[0]["started_at"] == dt.datetime(2025, 1, 1, 12, 5, tzinfo=dt.UTC) and rows[0]["eval_seconds"] == 60.25
    assert rows[2]["error"] == "MergeError: boom" and rows[2]["publish_seconds"] is None
    assert [r["run_id"] for r in ledger.read(status="failed")] == ["20250101T120100Z-a"]
    assert len(ledger.read(limit=2)) == 2 and ledger.read(pipeline="other") == []
    assert ledger.decided("unit", "rh", "fp1")["run_id"] == "20250101T120500Z-b"
    assert ledger.decided("unit", "rh", "fp3") is None and ledger.decided("unit", "other", "fp1") is None
    assert ledger.failures("unit", "rh", "fp1") == 1
    assert sorted(Location(f"{url}/ledger", options).list()) == sorted(f"{r['run_id']}.parquet" for r in rows)
    with pytest.raises(ValueError, match="status 'done' is not one of"):
        record("x", "done", 0)


def test_runs_cli_table_json_and_filters(ledger_s3):
    url, options, _ = ledger_s3
    base = [f"{url}/ledger", "--storage-options", json.dumps(options)]
    table = CliRunner().invoke(runs, base)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:3] == ["RUN", "PIPELINE", "STATUS"]
    assert lines[1].split()[:3] == ["20250101T120500Z-b", "unit", "published"]
    assert "uppercase=0.750 reversal=0.000" in lines[1] and "s3://b/runs/20250101T120500Z-b/model" in lines[1]
    assert "MergeError: boom" in lines[3] and "12.5" in lines[3]
    only = CliRunner().invoke(runs, [*base, "--status", "gate_failed"])
    assert [line.split()[0] for line in only.output.splitlines()[1:]] == ["20250101T120300Z-c"]
    data = json.loads(CliRunner().invoke(runs, [*base, "--json", "--limit", "1"]).output)
    assert len(data) == 1 and data[0]["metrics"]["accuracy"]["merged"]["uppercase"] == 0.75
    assert data[0]["started_at"] == "2025-01-01T12:05:00+00:00"
    empty = CliRunner().invoke(runs, [f"{url}/nothing-here", "--storage-options", json.dumps(options)])
    assert empty.exit_code == 0 and "no runs in" in empty.output
    assert CliRunner().invoke(runs, [*base, "--status", "done"]).exit_code == 2


# -- publish and the gate decision ---------------------------------------------------------------------
def report_for(merged_score: float) -> EvalReport:
    """A real report of three models on one task: base 0.5, specialist sft-upper 1.0, merged as given."""
    scores = {"base": 0.5, "sft-upper": 1.0, "merged": merged_score}
    rows = [{"model": model, "suite": "s", "task": "upper", "example": i, "prompt": "p", "answer": "a",
             "completion": "", "prediction": "", "correct": i < score * 4, "num_tokens": 1}
            for model, score in scores.items() for i in range(4)]
    roles = resolve_roles(list(scores), ["upper"], base="base", inputs=["sft-upper"])
    report = EvalReport({m: f"/{m}" for m in scores}, [{"name": "s", "tasks": ["upper"]}], rows, roles)
    report.gate_checks = check_gates(["merged>=0.75*specialist"], report.accuracy(), roles)
    return report


def test_promotion_is_atomic_and_a_failed_gate_leaves_the_pointer_untouched(tmp_path):
    root = tmp_path / "published"
    spec = parse_spec(spec_data("b", ["m"], str(root)))
    first = promote(str(root), url="runs/1/model", run_id="1", recipe_hash="rh", metrics={"a": 1})
    assert read_pointer(str(root)) == first and sorted(os.listdir(root)) == [POINTER_NAME]
    before = (root / POINTER_NAME).read_bytes()
    failed = RunResult("2", "failed", "rh", "fp", output_url="runs/2/model")
    conclude(spec, failed, report_for(0.5))
    assert failed.status == "gate_failed" and "FAILED on task upper" in failed.failed_gates[0]
    assert (root / POINTER_NAME).read_bytes() == before and failed.pointer is None
    held = Lease(str(tmp_path / "lease"), 60)
    lost = Lease(str(tmp_path / "lease"), 60)
    assert held.acquire()
    with pytest.raises(LeaseLost, match="not publishing"):
        conclude(spec, RunResult("3", "failed", "rh", "fp", output_url="runs/3/model"), report_for(1.0), lost)
    assert (root / POINTER_NAME).read_bytes() == before
    passed = RunResult("4", "failed", "rh", "fp", output_url="runs/4/model", report_url="runs/4/eval")
    conclude(spec, passed, report_for(1.0), held)
    pointer = read_pointer(str(root))
    assert passed.status == "published" and pointer["run_id"] == "4" and pointer["url"] == "runs/4/model"
    assert pointer["metrics"] == {"accuracy": {"upper": 1.0}, "report": "runs/4/eval"}
    assert sorted(os.listdir(root)) == [POINTER_NAME]  # the temporary file was renamed, none left behind
    shadow = parse_spec(spec_data("b", ["m"], str(root), publish={"root": str(root), "promote": False}))
    merged = RunResult("5", "failed", "rh", "fp", output_url="runs/5/model")
    conclude(shadow, merged, report_for(1.0))
    assert merged.status == "merged" and read_pointer(str(root))["run_id"] == "4"


def test_pointer_on_object_storage(s3_bucket):
    url, options = s3_bucket
    assert read_pointer(f"{url}/pub", options) is None
    promote(f"{url}/pub", url=f"{url}/pub/runs/1/model", run_id="1", recipe_hash="rh", metrics={},
            storage_options=options)
    assert read_pointer(f"{url}/pub", options)["url"] == f"{url}/pub/runs/1/model"


# -- scheduler ticks that decide without running ---------------------------------------------------------
def test_ticks_that_do_nothing_say_why(tiny_family, tmp_path):
    agents = tmp_path / "agents"
    shutil.copytree(tiny_family["sft-a"], agents / "sft-a")
    data = spec_data(tiny_family["base"], [f"{agents}/*/"], str(tmp_path / "pub"), max_failures=2)
    spec = parse_spec({**data, "merge": {**data["merge"], "min_models": 2}})
    scheduler = Scheduler(spec, Runtime(spec), owner="me")
    waiting = scheduler.tick()
    assert waiting.action == "waiting" and "at least 2 ready" in waiting.reason and waiting.exit_code == 0
    shutil.copytree(tiny_family["sft-b"], agents / "sft-b")
    inputs = resolve_inputs(spec)
    key = {"recipe_hash": recipe_hash(spec, inputs), "fingerprints": inputs.fingerprints.digest}
    assert key["recipe_hash"] == template_hash(inputs.recipe(spec, str(tmp_path / "elsewhere")))
    ledger = Ledger(spec.ledger_url)
    for i in range(2):
        ledger.append(RunRecord(run_id=f"r{i}", pipeline="unit", started_at=dt.datetime.now(dt.UTC),
                                finished_at=dt.datetime.now(dt.UTC), status="failed", recipe_hash=key["recipe_hash"],
                                fingerprint_set=key["fingerprints"], error="boom"))
    gave_up = scheduler.tick()
    assert gave_up.action == "gave_up" and "2 runs on these inputs failed" in gave_up.reason
    other = Lease(spec.lease_url, 60, owner="other-host")
    assert other.acquire()
    ledger.append(RunRecord(run_id="r9", pipeline="unit", started_at=dt.datetime.now(dt.UTC),
                            finished_at=dt.datetime.now(dt.UTC), status="published", recipe_hash=key["recipe_hash"],
                            fingerprint_set=key["fingerprints"]))
    done = scheduler.tick()
    assert done.action == "already_done" and "already published by run r9" in done.reason
    assert len(ledger.read()) == 3  # no-op ticks write nothing
    shutil.copytree(tiny_family["rl-c"], agents / "rl-c")  # new inputs, but another scheduler holds the lease
    held = scheduler.tick()
    assert held.action == "lease_held" and "other-host" in held.reason
    with pytest.raises(DistmergeError, match="has no schedule"):
        scheduler.watch()


# -- job entrypoints -----------------------------------------------------------------------------------
def load_script(name: str):
    import importlib.util

    module_spec = importlib.util.spec_from_file_location(name, REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_entrypoint_flags():
    one_shot = load_script("merge_eval_publish").build_parser()
    args = one_shot.parse_args(["spec.yaml", "--workers", "4", "--address", "auto", "--dry-run"])
    assert (args.spec, args.workers, args.address, args.dry_run) == ("spec.yaml", 4, "auto", True)
    assert {a.dest for a in one_shot._actions} == {"help", "spec", "workers", "address", "dry_run"}
    scheduled = load_script("scheduled_merge").build_parser()
    args = scheduled.parse_args(["spec.yaml", "--once", "--address", "auto", "--workers", "2"])
    assert (args.spec, args.once, args.address, args.workers) == ("spec.yaml", True, "auto", 2)
    assert {a.dest for a in scheduled._actions} == {"help", "spec", "once", "address", "workers"}


def test_dry_run_job_plans_from_headers_and_writes_nothing(tiny_family, tmp_path):
    root = tmp_path / "pub"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_data(tiny_family["base"], [tiny_family["sft-a"], tiny_family["sft-b"]],
                                                  str(root))))
    script = [sys.executable, str(REPO / "pipelines" / "merge_eval_publish.py")]
    done = subprocess.run([*script, str(spec_path), "--dry-run", "--workers", "3"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["would_run"] and plan["models"] == {"sft-a": tiny_family["sft-a"], "sft-b": tiny_family["sft-b"]}
    assert plan["plan"]["workers"] == 3 and plan["plan"]["blocks"] >= 1 and plan["already_decided"] is None
    assert plan["evaluation"] == {"models": ["base", "sft-a", "sft-b", "merged"], "suites": {"testbed": 4}}
    assert not root.exists()
    spec_path.write_text(yaml.safe_dump({**spec_data(tiny_family["base"], [tiny_family["sft-a"]], str(root)),
                                         "gates": ["merged>=sft-b"]}))
    bad = subprocess.run([*script, str(spec_path), "--dry-run"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert bad.returncode == 2 and "reference 'sft-b' is not an evaluated model" in bad.stderr


def test_job_exits_1_and_logs_why_when_the_run_fails(tiny_family, tiny_qwen2, tmp_path, caplog):
    # A 2-layer input against a 4-layer base: the merge fails (in this process: run.workers 0, no Ray needed).
    root = tmp_path / "pub"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_data(tiny_family["base"], [tiny_qwen2], str(root), run={"workers": 0})))
    before = promote(str(root), url="previous", run_id="previous", recipe_hash="-", metrics={})
    with caplog.at_level("INFO"):
        code = load_script("merge_eval_publish").main([str(spec_path)])
    assert code == 1
    [row] = Ledger(f"{root}/ledger").read()
    assert row["status"] == "failed" and row["error"] and row["merge_seconds"] is not None
    assert f"run {row['run_id']} failed: {row['error']}" in caplog.text
    assert read_pointer(str(root)) == before
    assert Lease(f"{root}/lease", 60).acquire()  # released on the way out


def test_pools_share_the_cluster_only_when_both_fit():
    from distmerge.production.runtime import fits_together

    workers, engines = {"CPU": 1.0, "GPU": 0.0}, {"CPU": 1.0, "GPU": 1.0}
    assert fits_together({"CPU": 2.0, "GPU": 1.0}, workers, engines)
    assert not fits_together({"CPU": 2.0}, workers, engines)  # no GPU for the engine next to the workers
    assert not fits_together({"CPU": 1.5, "GPU": 1.0}, workers, engines)
