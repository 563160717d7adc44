"""The `distmerge` command. Subcommands import lazily so `distmerge --help` stays fast (no torch/ray import).

Errors that distmerge raises on purpose (bad input, bad recipe, storage problems) print as one line without a
traceback and exit with status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import sys
import threading

import click

# name -> "module:attribute"; each module defines one click command or group.
SUBCOMMANDS = {
    "inspect": "distmerge.cli.inspect_cmd:inspect",
    "demo": "distmerge.cli.demo_cmd:demo",
    "merge": "distmerge.cli.merge_cmd:merge",
    "plan": "distmerge.cli.merge_cmd:plan",
    "methods": "distmerge.cli.merge_cmd:methods",
    "vector": "distmerge.cli.vector_cmd:vector",
    "testbed": "distmerge.cli.testbed_cmd:testbed",
    "eval": "distmerge.cli.eval_cmd:eval_cmd",
    "watch": "distmerge.cli.watch_cmd:watch",
    "runs": "distmerge.cli.runs_cmd:runs",
    "serve": "distmerge.cli.serve_cmd:serve",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="distmerge")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Merge large LLM checkpoints across Ray workers, from any fsspec URL."""
    ctx.ensure_object(dict)["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> None:
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(key, value)
    from distmerge.errors import DistmergeError

    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except DistmergeError as exc:
        if "--debug" in (argv if argv is not None else sys.argv):
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def run() -> None:
    """The `distmerge` console script: `main`, then a quick exit.

    Tearing down an interpreter that imported torch and Ray takes ~0.6 s (unloading their extension modules
    and freeing their heaps), about as long as a small merge's commit. When `main` is done everything the
    command wrote is closed, so the exit handlers run (Ray's shutdown, logging's flush), the standard streams
    are flushed and the process ends with `os._exit`. If another thread is still running, the normal exit
    waits for it instead. `main` itself stays importable for in-process callers (tests, pipelines).
    """
    try:
        main()
        status: object = 0
    except SystemExit as exc:
        status = exc.code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(status)
    if status is not None and not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`distmerge ... | head`) has nothing left to flush into
            pass
    os._exit(status or 0)
