"""Ray and the actor pools of production runs, kept for the life of the process.

A scheduler pays Ray start-up, merge-actor start-up and vLLM engine start-up once, not on every tick: the
`Runtime` creates each pool on first use and keeps it until `close()`. When the cluster cannot hold the merge
workers and the engines at once (e.g. one GPU and GPU workers), the pool not in use is closed before the other
starts, instead of the second waiting forever for resources the first holds. A Ray that the runtime started
(no address given, none running) is shut down with it; one it connected to is left running.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from distmerge.evaluation.options import resolve_device as engine_device
from distmerge.options import resolve_device
from distmerge.production.evaluate import ResultCache
from distmerge.production.spec import PipelineSpec

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 << 20  # manifests, prompts and completions only travel through it


def fits_together(capacity: dict[str, float], *demands: dict[str, float]) -> bool:
    """Whether the summed demands (resource -> amount) fit within `capacity`."""
    return all(sum(d.get(key, 0.0) for d in demands) <= capacity.get(key, 0.0) + 1e-9
               for key in {k for d in demands for k in d})


class Runtime:
    """Ray plus the merge worker pool and the vLLM engine pool, created on first use and kept until close()."""

    def __init__(self, spec: PipelineSpec, *, address: str | None = None, workers: int | None = None):
        updates: dict[str, Any] = {"address": address or spec.run.address}
        if workers is not None:
            updates["workers"] = workers
        self.run_options = spec.run.model_copy(update=updates)
        self.eval_options = spec.evaluation.options(self.run_options.address)
        self.results = ResultCache()  # evaluations of unchanged checkpoints, reused by later runs
        self._started_ray = False
        self._merge_pool = None
        self._engine_pool = None

    def ensure_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        address = self.run_options.address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit` jobs
        if address:
            ray.init(address=address, namespace="distmerge", log_to_driver=True)
        else:
            needed = (self.run_options.workers * self.run_options.cpus_per_worker
                      + self.eval_options.num_actors * self.eval_options.cpus_per_actor)
            ray.init(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)), include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, namespace="distmerge")
        self._started_ray = True

    def merge_pool(self):
        """Merge worker actors, or None when the spec merges in this process (run.workers: 0)."""
        if self.run_options.workers == 0:
            return None
        if self._merge_pool is None:
            from distmerge.worker_pool import WorkerPool

            self.ensure_ray()
            if self._engine_pool is not None and not self._room_for_both():
                log.info("closing the vLLM engines: the cluster cannot hold them and the merge workers at once")
                self._engine_pool.close()
                self._engine_pool = None
            self._merge_pool = WorkerPool(self.run_options, self._merge_device())
        return self._merge_pool

    def engine_pool(self):
        if self._engine_pool is None:
            from distmerge.evaluation.engine import EnginePool

            self.ensure_ray()
            if self._merge_pool is not None and not self._room_for_both():
                log.info("closing the merge workers: the cluster cannot hold them and the vLLM engines at once")
                self._merge_pool.close()
                self._merge_pool = None
            self._engine_pool = EnginePool(self.eval_options)
        return self._engine_pool

    def _merge_device(self) -> str:
        return resolve_device(self.run_options.device)

    def _room_for_both(self) -> bool:
        """Whether the cluster's resources hold the merge workers and the engines together (else they take turns)."""
        import ray

        run, evaluation = self.run_options, self.eval_options
        merge = {"CPU": run.workers * run.cpus_per_worker,
                 "GPU": run.workers * run.gpus_per_worker if self._merge_device() == "cuda" else 0.0}
        engines = {"CPU": evaluation.num_actors * evaluation.cpus_per_actor,
                   "GPU": float(evaluation.num_actors) if engine_device(evaluation.device) == "gpu" else 0.0}
        return fits_together(ray.cluster_resources(), merge, engines)

    def close(self) -> None:
        for pool in (self._merge_pool, self._engine_pool):
            if pool is not None:
                pool.close()
        self._merge_pool = self._engine_pool = None
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
