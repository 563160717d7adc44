"""The local Ray a `distmerge merge --workers N` starts for itself: started early, or only once its start-up
lane asks for it; stopped with every process it started; in the background while the driver merges."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distmerge.local_ray import LocalRay
from distmerge.options import RunOptions
from tests.test_resume_and_jobs import REPO, distmerge, shards, write_recipe


@pytest.mark.parametrize("lane", ["--merge-while-starting", "--no-merge-while-starting"])
def test_cli_merge_on_its_own_local_ray_matches_the_single_process_merge(tiny_family, tmp_path, lane):
    """`distmerge merge --workers N` merges on a local Ray of its own and stops it: the same bytes as without
    Ray, no autoscaler monitor or dashboard, and no Ray process of its own left behind. Without the start-up
    lane Ray starts early (while torch imports); with it, a tiny merge the driver finishes in a moment never
    starts Ray at all."""
    recipe = write_recipe(tmp_path, tiny_family, str(tmp_path / "local"), method="ties")
    local = distmerge("merge", str(recipe), "--block-size", "64KiB", "--no-progress")
    assert local.returncode == 0, local.stderr[-2000:]
    # This merge's Ray keeps its sockets and logs here (a short path: sockets are limited to 107 bytes), and
    # its processes name it on their command lines.
    ray_tmp = Path(tempfile.mkdtemp(prefix="dm-ray-", dir="/tmp"))
    on_ray = distmerge("merge", str(recipe), "--output", str(tmp_path / "ray-out"), "--workers", "2",
                       "--cpus-per-worker", "0.5", "--block-size", "64KiB", "--no-progress", lane,
                       env={"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""})
    assert on_ray.returncode == 0, on_ray.stderr[-2000:]
    assert "published" in on_ray.stdout
    assert shards(tmp_path / "ray-out") == shards(tmp_path / "local")
    run = json.loads((tmp_path / "ray-out" / "distmerge_provenance.json").read_text())["run"]
    # A tiny merge's blocks take the driver a moment: never as long as Ray and an actor take to start.
    assert (run["block_tasks_in_driver"] > 0) == (lane == "--merge-while-starting"), run
    assert run["actors_started"] == (0 if lane == "--merge-while-starting" else 2), run
    assert run["ray_started"] == (lane == "--no-merge-while-starting"), run
    leftovers = subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True).stdout.split()
    sessions = list(ray_tmp.glob("ray/session_*"))
    logs = {p.name for p in ray_tmp.glob("ray/session_*/logs/*")}
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert leftovers == [], f"Ray processes left behind: {leftovers}"
    if lane == "--merge-while-starting":
        assert sessions == [], "the lane never asked for Ray, yet it was started"
    else:
        # The local Ray was lean: GCS, raylet and its agents ran, the autoscaler monitor and dashboard did not.
        assert {"gcs_server.out", "raylet.out", "log_monitor.log"} <= logs, sorted(logs)
        assert not {name for name in logs if name.startswith(("monitor.", "dashboard."))}, sorted(logs)


def test_cli_merge_that_fails_while_its_ray_starts_leaves_no_ray_behind(tiny_family, tmp_path):
    """The local Ray comes up while the recipe is read: a recipe that fails first still has it stopped, with
    every process it had started so far (none is left as an orphan)."""
    recipe = write_recipe(tmp_path, {**tiny_family, "rl-c": str(tmp_path / "no-such-model")}, str(tmp_path / "out"))
    ray_tmp = Path(tempfile.mkdtemp(prefix="dm-ray-", dir="/tmp"))
    # Without the start-up lane, Ray starts before the recipe is read.
    failed = distmerge("merge", str(recipe), "--workers", "1", "--no-progress", "--no-merge-while-starting",
                       env={"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""})
    time.sleep(1.0)  # let anything orphaned show up
    leftovers = subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True).stdout.split()
    started = any(ray_tmp.glob("ray/session_*/logs"))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    for pid in leftovers:  # stopped here, so a failure of this test does not leave them running
        os.kill(int(pid), signal.SIGKILL)
    assert failed.returncode != 0 and "no-such-model" in failed.stderr, failed.stderr[-2000:]
    assert started, "Ray never started: the test proved nothing"
    assert leftovers == [], f"Ray processes left behind: {leftovers}"


PRIORITIES = """
import json, os, sys, time
import psutil
from distmerge.local_ray import started_early
from distmerge.merge import run_merge
from distmerge.options import RunOptions
from distmerge.recipe import load_recipe
from distmerge.worker_pool import WorkerPool

options = RunOptions(workers=1, merge_while_starting=True)
with started_early(options):
    pool = WorkerPool(options, "cpu")
    try:
        deadline = time.time() + 120
        while not pool.an_actor_ready() and time.time() < deadline:
            time.sleep(0.05)
        ray_nice = {p.name(): p.nice() for p in psutil.Process().children(recursive=True)
                    if p.name() in ("gcs_server", "raylet")}
        import ray
        pid = ray.get(pool.actors[0].where.remote())["pid"]
        idle = os.getpriority(os.PRIO_PROCESS, pid)
        # Blocks on the actor (no start-up lane here): it takes up the driver's priority with the first.
        run_merge(load_recipe(sys.argv[1]), RunOptions(workers=1, merge_while_starting=False, progress=False,
                                                       block_size=65536), pool=pool)
        print(json.dumps({"driver": os.getpriority(os.PRIO_PROCESS, 0), "ray": ray_nice, "idle_actor": idle,
                          "actor": os.getpriority(os.PRIO_PROCESS, pid)}))
    finally:
        pool.close()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_a_local_ray_started_while_the_driver_merges_starts_in_the_background(tiny_family, tmp_path):
    """With the start-up lane on, the CLI's local Ray starts at nice 19 (its start-up must not slow the merge
    the driver runs meanwhile), its actors stay there until given a block, the driver keeps its priority, and
    an actor at work returns to the driver's priority where the system allows raising it."""
    recipe = write_recipe(tmp_path, tiny_family, str(tmp_path / "out"), method="ties")
    ray_tmp = Path(tempfile.mkdtemp(prefix="dm-ray-", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    try:
        done = subprocess.run([sys.executable, "-c", PRIORITIES, str(recipe)], capture_output=True, text=True,
                              timeout=300, env=env, cwd=REPO)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    driver = seen["driver"]
    assert driver < 19 and seen["ray"] == {"gcs_server": 19, "raylet": 19} and seen["idle_actor"] == 19, seen
    # Raising a priority again needs CAP_SYS_NICE (root in most containers): ask the kernel, in a child.
    may_raise = subprocess.run([sys.executable, "-c", "import os; os.nice(1); os.setpriority(os.PRIO_PROCESS, 0, "
                                f"{driver})"], capture_output=True).returncode == 0
    assert seen["actor"] == (driver if may_raise else 19), seen


def test_a_local_ray_that_fails_to_start_says_why(monkeypatch):
    monkeypatch.setattr("distmerge.local_ray.LOCAL_OBJECT_STORE_BYTES", 1024**2)  # below Ray's minimum
    starting = LocalRay(RunOptions(workers=1), start=False)
    assert not starting.started
    with pytest.raises(RuntimeError, match="the local Ray did not start: .*object store"):  # wait starts it
        starting.wait(timeout=120)
    starting.stop()  # returns: nothing to shut down, and its thread and head process end
    assert not starting._thread.is_alive() and starting._head.poll() is not None


LANE_ASKS_FOR_RAY = """
import json, sys, time
import distmerge.execute_ray as executor
from distmerge.local_ray import _early, started_early
from distmerge.merge import run_merge
from distmerge.options import RunOptions
from distmerge.recipe import load_recipe
from distmerge.startup_lane import StartupLane

# Any block left is worth Ray and an actor: the lane asks for Ray once it has finished a block.
executor.ACTOR_START_SECONDS = executor.RAY_START_SECONDS = 0.0
# Blocks after the first two wait in the lane until an actor has answered, so the actors surely take some (a
# tiny merge would otherwise end long before one is up).
executors = []
init = executor.RayExecutor.__init__
executor.RayExecutor.__init__ = lambda self, *a, **k: executors.append(self) or init(self, *a, **k)
write_work = StartupLane.write_work

def gated_write_work(self, stats):
    work = write_work(self, stats)

    def gated(block):
        deadline = time.time() + 120
        while block.id >= 2 and not executors[0].pool.answered and time.time() < deadline:
            time.sleep(0.02)
        return work(block)
    return gated

StartupLane.write_work = gated_write_work
options = RunOptions(workers=1, progress=False, block_size=65536, device="cpu", merge_while_starting=True)
with started_early(options):
    started_before_asked = _early["ray"].started
    run_merge(load_recipe(sys.argv[1]), options)
print(json.dumps({"started_before_asked": started_before_asked}))
"""


def test_a_local_ray_left_to_the_lane_starts_when_the_lane_asks_and_its_actors_take_the_rest(tiny_family, tmp_path):
    """A CPU merge's local Ray is not started with the merge but when the start-up lane finds blocks left that
    would outlast Ray's and an actor's start-up (thresholds at 0 here): Ray then starts, the driver connects,
    an actor takes the blocks the lane had not started, and the bytes are the single-process merge's."""
    recipe = write_recipe(tmp_path, tiny_family, str(tmp_path / "out"), method="ties")
    reference = tmp_path / "reference"
    assert distmerge("merge", str(recipe), "--output", str(reference), "--block-size", "64KiB").returncode == 0
    ray_tmp = Path(tempfile.mkdtemp(prefix="dm-ray-", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    try:
        done = subprocess.run([sys.executable, "-c", LANE_ASKS_FOR_RAY, str(recipe)], capture_output=True,
                              text=True, timeout=300, env=env, cwd=REPO)
        leftovers = subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True, text=True).stdout.split()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"started_before_asked": False}
    assert leftovers == [], f"Ray processes left behind: {leftovers}"
    assert shards(tmp_path / "out") == shards(reference)
    run = json.loads((tmp_path / "out" / "distmerge_provenance.json").read_text())["run"]
    assert run["ray_started"] and run["actors_started"] == 1, run
    assert 2 <= run["block_tasks_in_driver"] < run["block_tasks"], run


def test_a_local_ray_stopped_before_it_started_never_starts():
    starting = LocalRay(RunOptions(workers=1), start=False)
    assert not starting.started
    starting.stop()  # nothing to stop
    assert not starting.started
    with pytest.raises(RuntimeError, match="stopped before it started"):
        starting.wait(timeout=1)
