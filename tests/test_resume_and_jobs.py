"""A killed driver resumes from verified staged shards; `ray job submit` runs pipelines/merge.py on a real
`ray start --head` cluster on 127.0.0.1 (started and stopped by the test), and a failing merge fails the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def write_recipe(tmp_path: Path, family: dict, output: str, method: str = "dare_ties", **extra) -> Path:
    recipe = {"base": family["base"], "method": method, "output": output, "seed": 3,
              "models": [{"name": n, "path": family[n]} for n in ("sft-a", "sft-b", "rl-c")], **extra}
    path = tmp_path / f"{method}-{Path(output).name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def shards(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".safetensors"}


def distmerge(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "distmerge"), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kwargs)


def test_killed_driver_resumes_with_verified_shards(tiny_family, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_family, str(out))
    reference = tmp_path / "reference"
    assert distmerge("merge", str(recipe), "--output", str(reference), "--block-size", "64KiB").returncode == 0

    marker = tmp_path / "hung"
    proc = subprocess.Popen([str(BIN / "distmerge"), "merge", str(recipe), "--block-size", "64KiB", "--no-progress"],
                            env={**os.environ, "DISTMERGE_FAULT": "hang:5", "DISTMERGE_FAULT_MARKER": str(marker)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "driver never reached block 5"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "model.safetensors.index.json").exists()  # an incomplete merge is never visible
    staging = tmp_path / ".out.distmerge-staging"
    assert len(list((staging / "records").iterdir())) == 5

    # A staged shard that no longer verifies is recomputed, not trusted.
    victim = next(p for p in sorted(staging.iterdir()) if p.suffix == ".safetensors")
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")

    resumed = distmerge("merge", str(recipe), "--block-size", "64KiB", "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "4 reused" in resumed.stdout
    assert shards(out) == shards(reference)
    assert not staging.exists()


def test_resume_refuses_a_different_plan(tiny_family, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, tiny_family, str(out))
    marker = tmp_path / "hung"
    proc = subprocess.Popen([str(BIN / "distmerge"), "merge", str(recipe), "--block-size", "64KiB", "--no-progress"],
                            env={**os.environ, "DISTMERGE_FAULT": "hang:1", "DISTMERGE_FAULT_MARKER": str(marker)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not marker.exists():
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    changed = write_recipe(tmp_path, tiny_family, str(out), seed=4)
    result = distmerge("merge", str(changed), "--block-size", "64KiB", "--resume")
    assert result.returncode == 2 and "cannot resume" in result.stderr and "without --resume" in result.stderr


@pytest.fixture
def ray_head(tmp_path_factory):
    """`ray start --head` on 127.0.0.1 with its own temp dir; stopped by killing exactly its processes."""
    temp_dir = Path(f"/tmp/dm-ray-{os.getpid()}-{free_port()}")
    port, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--include-dashboard=true", "--disable-usage-stats"],
        capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stderr
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _kill_processes_mentioning(str(temp_dir))


def _kill_processes_mentioning(needle: str) -> None:
    mine = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
            # Some of the head's processes (client server, dashboard and runtime-env agents) do not name the
            # temp dir on their command line but hold files open in it.
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        if (needle in cmdline or any(needle in _link(f"/proc/{pid}/fd/{fd}") for fd in fds)) and int(pid) != os.getpid():
            mine.append(int(pid))
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed since the listing
        return ""


def submit_job(address: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit ... -- python pipelines/merge.py ARGS`, retried while the job agent is still starting."""
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
               "python", "pipelines/merge.py", *args]
    deadline = time.time() + 90
    while True:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        if "No available agent" not in result.stderr or time.time() > deadline:
            return result
        time.sleep(2)


def test_ray_job_submit_runs_pipeline_and_failures_fail_the_job(ray_head, tiny_family, tmp_path):
    address, env = ray_head
    out = tmp_path / "job-out"
    recipe = write_recipe(tmp_path, tiny_family, str(out), method="ties")
    ok = submit_job(address, env, str(recipe), "--workers", "2", "--cpus-per-worker", "0.5", "--block-size",
                    "64KiB", "--no-progress")
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "published" in ok.stdout and (out / "model.safetensors.index.json").exists()

    reference = tmp_path / "local"
    assert distmerge("merge", str(recipe), "--output", str(reference), "--block-size", "64KiB").returncode == 0
    assert shards(out) == shards(reference)

    bad = write_recipe(tmp_path, {**tiny_family, "rl-c": str(tmp_path / "missing-model")}, str(tmp_path / "bad"))
    failed = submit_job(address, env, str(bad), "--no-progress")
    assert failed.returncode != 0
    logs = failed.stdout + failed.stderr
    assert "missing-model" in logs and "not found" in logs and "failed" in logs, logs[-4000:]
