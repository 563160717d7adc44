"""Merges across the nodes of a ray.cluster_utils.Cluster: parity, and a node lost mid-merge."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from distmerge.merge import run_merge
from distmerge.options import RunOptions
from tests.test_ray_merge import BLOCK, merged_bytes, recipe_for


@pytest.fixture(scope="module")
def reference(tiny_family, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("cluster-ref")
    out = {}
    for key, method, schedule in (("ties", "ties", None), ("lines", "ram_plus", {"alpha": "auto", "beta": 0.5})):
        run_merge(recipe_for(tiny_family, method, str(root / key), schedule),
                  RunOptions(block_size=BLOCK, progress=False))
        out[key] = merged_bytes(str(root / key))
    return out


def merge(family, method, out, workers, schedule=None):
    # block_timeout is a safety net: if the node removal misfired, the hung block is retried, not waited on.
    run_merge(recipe_for(family, method, str(out), schedule),
              RunOptions(workers=workers, block_size=BLOCK, progress=False, cpus_per_worker=0.5, block_timeout=180))
    return merged_bytes(str(out))


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    fast_failure = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                    "health_check_timeout_ms": 1000, "health_check_failure_threshold": 5}
    # No CPUs on the head: every merge actor lives on a worker node, so the hung one can be removed.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                       "_system_config": fast_failure})
    workers = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="distmerge-test")
    yield c, workers
    ray.shutdown()
    c.shutdown()


def test_multi_node_parity_and_node_loss(cluster, tiny_family, reference, tmp_path, monkeypatch):
    c, worker_nodes = cluster
    assert merge(tiny_family, "ties", tmp_path / "spread", 3) == reference["ties"]

    marker = tmp_path / "hang-fired"
    monkeypatch.setenv("DISTMERGE_FAULT", "hang:2")
    monkeypatch.setenv("DISTMERGE_FAULT_MARKER", str(marker))
    removed: list[str] = []

    def remove_hung_node() -> None:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        if not marker.exists():
            return
        node_id = marker.read_text().split()[1]
        for node in worker_nodes:
            if node.node_id == node_id:
                c.remove_node(node, allow_graceful=False)
                removed.append(node_id)

    killer = threading.Thread(target=remove_hung_node, daemon=True)
    killer.start()
    got = merge(tiny_family, "ram_plus", tmp_path / "lost", 3, {"alpha": "auto", "beta": 0.5})
    killer.join(timeout=10)
    assert removed, "the hung worker was not on a removable node"
    assert got == reference["lines"]
    assert not (tmp_path / ".lost.distmerge-staging").exists()
    assert (tmp_path / "lost" / "model.safetensors.index.json").exists()
