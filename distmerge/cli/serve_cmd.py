"""`distmerge serve URL`: an OpenAI-compatible endpoint (vLLM) for a committed checkpoint, until Ctrl-C.

    distmerge serve runs/merges/ties --dtype float32 --eager
    distmerge serve s3://bucket/published/agents --host 0.0.0.0 --port 8000   # serves <root>/latest.json's model
    distmerge serve runs/merges/ties --replicas 2                             # Ray Serve, 2 vLLM replicas
    distmerge serve runs/merges/ties -- --max-num-seqs 16                     # after --: flags for vLLM itself

The endpoint and a curl example go to stdout once the server answers; vLLM's own log is echoed to stderr.
Ctrl-C or SIGTERM stops the server and every process it started, then exits 0. Exit status 1 if the server
fails to start or dies while serving, 2 for bad input (e.g. a URL that is not a committed checkpoint).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time

import click

from distmerge.cli.options import storage_options_option


@click.command(context_settings={"show_default": True})
@click.argument("url")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--host", default="127.0.0.1", help="Address to bind; 0.0.0.0 exposes the server to the network "
              "(then set --api-key).")
@click.option("--port", default=8000, type=int, help="Port to bind; 0 picks a free one.")
@click.option("--api-key", envvar="DISTMERGE_API_KEY", default=None, show_default=False,
              help="Require `Authorization: Bearer KEY` on /v1 routes (vLLM's own key check, given to it as "
              "VLLM_API_KEY so the key stays out of `ps`). Env: DISTMERGE_API_KEY.")
@click.option("--served-model-name", default=None, show_default=False,
              help="The `model` name clients send [default: the URL's last folder].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              help="Weights dtype; float32 on CPU gives the same greedy tokens as transformers.")
@click.option("--max-model-len", type=int, default=None, show_default=False,
              help="Context length [default: the model's].")
@click.option("--eager", is_flag=True, help="Skip graph compilation (CUDA graphs, torch.compile): starts in "
              "seconds instead of about a minute, decodes slower.")
@click.option("--startup-timeout", type=float, default=600.0, help="Seconds to wait for the server to answer.")
@click.option("--replicas", type=click.IntRange(min=1), default=1,
              help="vLLM replicas behind one endpoint; more than 1 runs them with Ray Serve on a local Ray.")
@click.option("--cache-dir", default=None, show_default=False,
              help="Where remote checkpoints are copied (vLLM loads local folders) [default: .cache/serve-models].")
@click.option("--quiet", is_flag=True, help="Do not echo vLLM's log to stderr (one replica; Ray Serve's replicas "
              "log through Ray).")
@storage_options_option
def serve(url, vllm_args, host, port, api_key, served_model_name, dtype, max_model_len, eager, startup_timeout,
          replicas, cache_dir, quiet, storage_options) -> None:
    """Serve the committed checkpoint at URL (or a publish root's latest.json) over the OpenAI API."""
    from distmerge.serving import ServeReplicas, VLLMServer

    settings = dict(host=host, port=port, api_key=api_key, storage_options=storage_options,
                    served_model_name=served_model_name, dtype=dtype, max_model_len=max_model_len,
                    enforce_eager=eager, startup_timeout=startup_timeout, cache_dir=cache_dir)
    if replicas > 1:
        if vllm_args:
            raise click.UsageError("extra vLLM flags after -- apply to a single server; drop them or --replicas")
        server = ServeReplicas(url, replicas=replicas, **settings)
    else:
        server = VLLMServer(url, extra_args=vllm_args, **settings)
        click.echo(f"vLLM log: {server.log_path}", err=True)
        if not quiet:
            threading.Thread(target=_echo_log, args=(server.log_path,), daemon=True).start()
    _stop_on_signals()
    try:
        server.start()
        _stop_on_signals()  # again: ray.init (--replicas) installs its own SIGTERM handler
        _announce(server, api_key)
        while (code := server.wait(1.0)) is None:
            pass
    except KeyboardInterrupt:
        click.echo("stopping the server", err=True)
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        server.stop()
        click.echo("stopped", err=True)
        return
    server.stop()
    click.echo(f"the server exited with status {code}", err=True)
    sys.exit(1)


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (kubectl delete, docker stop) raise KeyboardInterrupt, which stops the server. Set
    explicitly: a process started in the background by a non-interactive shell inherits SIGINT ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _announce(server, api_key: str | None) -> None:
    if server.served.chat_template:
        click.echo(f"note: the checkpoint has no chat template; /v1/chat/completions uses distmerge's plain one "
                   f"({server.served.chat_template})", err=True)
    body = json.dumps({"model": server.model_name, "prompt": "Hello", "max_tokens": 16, "temperature": 0})
    auth = ' -H "Authorization: Bearer $DISTMERGE_API_KEY"' if api_key else ""
    click.echo(f"serving {server.served.url} as {server.model_name!r}")
    click.echo(f"endpoint: {server.base_url}")
    click.echo(f"curl {server.base_url}/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}")
    click.echo("Ctrl-C stops the server", err=True)


def _echo_log(path: str) -> None:
    """Follow the server's log file to stderr, like `vllm serve` prints it (runs until the process exits)."""
    while not os.path.exists(path):  # created once the checkpoint is resolved and copied
        time.sleep(0.2)
    with open(path, errors="replace") as fh:
        while True:
            line = fh.readline()
            if line:
                sys.stderr.write(line)
            else:
                time.sleep(0.2)
