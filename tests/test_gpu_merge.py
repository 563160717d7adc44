"""The CUDA path, where a GPU is present (CI has none, so these skip there): merges computed on the GPU in
this process, and Ray workers that reserve GPUs.

On the GPU every element-wise float32 operation rounds as on the CPU (division by a scalar included:
`exact.divide_`), and the selections (top-k, bands, ranks, random masks) are exact integer work or come from
the CPU's random stream, so outputs are the CPU's bytes. The exceptions are float reductions over whole tensors: model_stock's cosines and LiNeS' `auto`
alpha (norms). A GPU adds those in another order, so they agree with the CPU to rounding, and with each
other byte for byte on the same device for any worker count.
"""

from __future__ import annotations

import pytest
import torch

from distmerge.methods import method_names
from tests.test_ray_merge import merge

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FLOAT_REDUCTIONS = {"model_stock"}  # methods whose result depends on the order of a float sum
LINES = {"alpha": "auto", "beta": 0.5}


def _every_method(family, root, device: str) -> dict[str, dict[str, bytes]]:
    """Single-process merges of every method (and RAM+ with LiNeS auto alpha) on one device."""
    outputs = {m: merge(family, m, root / m, 0, device=device) for m in method_names()}
    outputs["ram_plus+lines"] = merge(family, "ram_plus", root / "lines", 0, LINES, device=device)
    return outputs


@pytest.fixture(scope="module")
def cpu_outputs(tiny_family, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    return _every_method(tiny_family, tmp_path_factory.mktemp("cpu"), "cpu")


@pytest.fixture(scope="module")
def gpu_outputs(tiny_family, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    return _every_method(tiny_family, tmp_path_factory.mktemp("gpu"), "cuda")


def _tensors(shards: dict[str, bytes]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return {name: t for blob in shards.values() for name, t in load(blob).items()}


@pytest.mark.parametrize("method", [*method_names(), "ram_plus+lines"])
def test_gpu_merge_matches_cpu(cpu_outputs, gpu_outputs, method):
    if method in FLOAT_REDUCTIONS or method.endswith("+lines"):
        cpu, gpu = _tensors(cpu_outputs[method]), _tensors(gpu_outputs[method])
        assert cpu.keys() == gpu.keys()
        for name in cpu:
            torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-6, msg=f"{method} {name}")
    else:
        assert gpu_outputs[method] == cpu_outputs[method], f"{method}: GPU bytes differ from the CPU's"


@pytest.fixture(scope="module")
def gpu_ray():
    import ray

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, object_store_memory=100 * 1024**2,
             namespace="distmerge-gpu-test")
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_workers_on_the_gpu_match_the_single_process_gpu_merge(gpu_ray, tiny_family, gpu_outputs,
                                                                   tmp_path, workers):
    for method in ("ties", "dare_ties", "model_stock", "ram_plus"):
        got = merge(tiny_family, method, tmp_path / method, workers, device="cuda",
                    gpus_per_worker=1 / workers)
        assert got == gpu_outputs[method], f"{method} with {workers} GPU workers"
    got = merge(tiny_family, "ram_plus", tmp_path / "lines", workers, LINES, device="cuda",
                gpus_per_worker=1 / workers)
    assert got == gpu_outputs["ram_plus+lines"]


def test_gpu_workers_hold_a_gpu(gpu_ray):
    from distmerge.options import RunOptions
    from distmerge.worker_pool import WorkerPool

    pool = WorkerPool(RunOptions(workers=2, cpus_per_worker=0.25, gpus_per_worker=0.5), "cuda")
    try:
        seen = gpu_ray.get([actor.where.remote() for actor in pool.actors])
    finally:
        pool.close()
    assert all(where["gpus"] for where in seen), seen
    assert all(where["cuda"] for where in seen), seen
