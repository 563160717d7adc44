"""The Ray executor: byte parity with the single-process merge for every method and worker count, on one
node and across the nodes of a ray.cluster_utils.Cluster, and recovery from a killed worker or a lost node."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray

from distmerge.execute_ray import dispatch_slots
from distmerge.merge import plan_recipe, run_merge
from distmerge.methods import method_names
from distmerge.options import RunOptions
from distmerge.recipe import parse_recipe
from distmerge.worker_pool import WorkerPool

BLOCK = 64 * 1024  # many blocks from a tiny model, so work really spreads over workers
PARAMS = {"ties": {"trim_scope": "global"}}  # the statistics path is the interesting one


def recipe_for(family: dict, method: str, output: str, schedule: dict | None = None):
    models = [{"name": n, "path": family[n]} for n in ("sft-a", "sft-b", "rl-c")]
    return parse_recipe({"base": family["base"], "models": models, "method": method, "seed": 7,
                         "params": PARAMS.get(method, {}), "output": output, "schedule": schedule})


def merged_bytes(path: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.suffix == ".safetensors"}


def merge(family, method, out, workers, schedule=None, pool=None, **options) -> dict[str, bytes]:
    run_merge(recipe_for(family, method, str(out), schedule),
              RunOptions(workers=workers, block_size=BLOCK, progress=False, cpus_per_worker=0.25, **options),
              pool=pool)
    return merged_bytes(str(out))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 1024**2, namespace="distmerge-test")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(local_ray):
    """Four actors reused by every merge of this module (a merge with k workers uses the first k)."""
    workers = WorkerPool(RunOptions(workers=4, cpus_per_worker=0.25), "cpu")
    yield workers
    workers.close()


@pytest.fixture(scope="module")
def references(tiny_family, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("reference")
    refs = {m: merge(tiny_family, m, root / m, 0) for m in method_names()}
    refs["ram_plus+lines"] = merge(tiny_family, "ram_plus", root / "lines", 0, {"alpha": "auto", "beta": 0.5})
    return refs


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_every_method_byte_identical_for_any_worker_count(pool, tiny_family, references, tmp_path, workers):
    for method in method_names():
        assert merge(tiny_family, method, tmp_path / method, workers, pool=pool) == references[method], method
    got = merge(tiny_family, "ram_plus", tmp_path / "lines", workers, {"alpha": "auto", "beta": 0.5}, pool=pool)
    assert got == references["ram_plus+lines"]


def test_killed_worker_is_replaced_and_output_identical(local_ray, tiny_family, references, tmp_path, monkeypatch):
    marker = tmp_path / "fault-fired"
    monkeypatch.setenv("DISTMERGE_FAULT", "crash:3")
    monkeypatch.setenv("DISTMERGE_FAULT_MARKER", str(marker))
    got = merge(tiny_family, "dare_ties", tmp_path / "out", 2)
    assert marker.exists(), "the fault never fired: the test proved nothing"
    assert got == references["dare_ties"]




def test_hung_worker_is_replaced_after_block_timeout(local_ray, tiny_family, references, tmp_path, monkeypatch):
    marker = tmp_path / "hang-fired"
    monkeypatch.setenv("DISTMERGE_FAULT", "hang:4")
    monkeypatch.setenv("DISTMERGE_FAULT_MARKER", str(marker))
    got = merge(tiny_family, "ram", tmp_path / "out", 2, block_timeout=8)
    assert marker.exists(), "the fault never fired: the test proved nothing"
    assert got == references["ram"]


def test_s3_inputs_and_output_on_ray_same_bytes(pool, tiny_family, references, s3_bucket, monkeypatch):
    from distmerge.storage import Location
    from tests.conftest import upload

    url, options = s3_bucket
    remote = {name: upload(path, f"{url}/in/{name}", options) for name, path in tiny_family.items()}
    recipe = recipe_for(remote, "ties", f"{url}/out/ties").model_copy(update={"storage_options": options})
    read = []  # what this driver reads: headers of the inputs, never a staged shard (the actors wrote them)
    fetch = Location._fetch
    monkeypatch.setattr(Location, "_fetch", lambda self, ranges: read.append(self.url) or fetch(self, ranges))
    run_merge(recipe, RunOptions(workers=2, block_size=BLOCK, progress=False, cpus_per_worker=0.25), pool=pool)
    assert read and not [u for u in read if "distmerge-staging" in u and u.endswith(".safetensors")], read
    out = Location(f"{url}/out/ties", options)
    got = {n: out.child(n).read_bytes() for n in sorted(out.list()) if n.endswith(".safetensors")}
    assert got == references["ties"]
    assert not Location(f"{url}/out/.ties.distmerge-staging", options).exists()


class StartingPool:
    """The module's pool, seen as a local Ray still starting until the start-up lane has staged `after`
    shards: a slow start made deterministic, so the lane hands over to the actors mid-pass."""

    local = True

    def __init__(self, pool: WorkerPool, records: Path, after: int):
        self.pool, self.records, self.after = pool, records, after
        while not pool.an_actor_ready():  # its actors are up: they are ready as soon as this pool says so
            time.sleep(0.01)

    def an_actor_ready(self) -> bool:
        staged = len(list(self.records.iterdir())) if self.records.is_dir() else 0
        return staged >= self.after

    @property
    def answered(self) -> bool:
        return self.an_actor_ready()

    def __getattr__(self, name: str):
        return getattr(self.pool, name)


@pytest.mark.parametrize("method", ["ties", "ram_plus"])  # global statistics: a whole map phase in the lane
def test_startup_lane_hands_over_to_the_actors_mid_pass(pool, tiny_family, references, tmp_path, method):
    out = tmp_path / method
    recipe = recipe_for(tiny_family, method, str(out))
    options = RunOptions(workers=2, block_size=BLOCK, progress=False, cpus_per_worker=0.25)
    starting = StartingPool(pool, tmp_path / f".{method}.distmerge-staging" / "records", after=2)
    result = run_merge(recipe, options, pool=starting)
    assert merged_bytes(str(out)) == references[method]
    run = json.loads((out / "distmerge_provenance.json").read_text())["run"]
    lane = run["block_tasks_in_driver"]
    # Every statistics pass and the first shards in the driver, the other shards on the actors.
    passes = len(plan_recipe(recipe, options)[1].phases())
    assert passes >= 1 and run["block_tasks"] == (passes + 1) * result.num_blocks
    assert passes * result.num_blocks + 2 <= lane < run["block_tasks"], (lane, result.num_blocks)


def test_startup_lane_is_off_when_asked(pool, tiny_family, references, tmp_path):
    out = tmp_path / "ties"
    starting = StartingPool(pool, tmp_path / ".ties.distmerge-staging" / "records", after=10**6)
    run_merge(recipe_for(tiny_family, "ties", str(out)), RunOptions(
        workers=2, block_size=BLOCK, progress=False, cpus_per_worker=0.25, merge_while_starting=False), pool=starting)
    assert merged_bytes(str(out)) == references["ties"]
    run = json.loads((out / "distmerge_provenance.json").read_text())["run"]
    assert run["block_tasks_in_driver"] == 0 and run["block_tasks"] > 0


def test_dispatch_leaves_the_last_round_to_whichever_worker_frees_up():
    load = {0: 0, 1: 0}
    # 2 single-thread workers, 4 blocks: one each; blocks 2 and 3 wait for the first free thread, instead of
    # queuing behind a block that may be slow while the other worker idles.
    assert dispatch_slots(load, 4, threads=1, ahead=1) == [0, 1]
    assert load == {0: 1, 1: 1}
    assert dispatch_slots({0: 0, 1: 0}, 10, threads=1, ahead=1) == [0, 1, 0, 1]  # long queue: one queued ahead
    assert dispatch_slots({0: 0, 1: 0}, 10, threads=1, ahead=0) == [0, 1]
    assert dispatch_slots({0: 0}, 4, threads=2, ahead=1) == [0, 0]
    assert dispatch_slots({0: 0}, 5, threads=2, ahead=1) == [0, 0, 0]
    assert dispatch_slots({0: 1, 1: 0}, 1, threads=1, ahead=1) == [1]  # the free worker
    assert dispatch_slots({0: 1, 1: 1}, 3, threads=1, ahead=1) == [0]  # 3 left: more than a round
    assert dispatch_slots({0: 1, 1: 1}, 2, threads=1, ahead=1) == []  # the last round waits for free threads


def test_startup_lane_asks_for_actors_only_while_blocks_wait_with_its_pace(tiny_family, tmp_path):
    """The lane asks whether actors should take over only while blocks wait for its threads, with how long it
    would take to merge them at its pace so far (None before a block is done); when told yes it returns the
    unstarted blocks to the caller."""
    from distmerge.startup_lane import StartupLane
    from distmerge.storage import Location

    _, job = plan_recipe(recipe_for(tiny_family, "task_arithmetic", str(tmp_path / "out")),
                         RunOptions(block_size=BLOCK))
    blocks = job.plan.blocks
    assert len(blocks) >= 6
    staging = Location(str(tmp_path / "staging"))
    lane = StartupLane(job, staging, threads=2)
    asked: list[float | None] = []
    advanced: list[int] = []
    try:
        every, running = lane.run_until(lambda s: asked.append(s) or False, blocks[:2], lane.write_work({}),
                                        advanced.append)
        assert not running and sorted(every) == [b.id for b in blocks[:2]] and asked == []  # none ever waited

        def after_three(seconds):
            asked.append(seconds)
            return len(asked) > 3 and seconds is not None

        done, running = lane.run_until(after_three, blocks, lane.write_work({}), advanced.append)
        lane.finish(running, done, advanced.append)
        assert len(done) < len(blocks)  # the rest was left to the actors
        paced = [s for s in asked if s is not None]
        assert paced and all(s > 0 for s in paced)
        # The estimate is the waiting blocks' bytes at the lane's pace: fewer blocks, fewer seconds.
        assert lane._seconds_for(blocks[:1]) < lane._seconds_for(blocks[:4])
    finally:
        lane.close()
