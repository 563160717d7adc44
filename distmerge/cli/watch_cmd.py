"""`distmerge watch SPEC`: the merge scheduler (see `distmerge.production.scheduler`).

    distmerge watch pipelines/specs/scheduled.yaml            # tick now, then on the spec's schedule
    distmerge watch pipelines/specs/scheduled.yaml --once     # one tick (cron jobs, tests)
    distmerge watch SPEC --interval 60 --workers 4 --address auto

With --once the exit status is 1 when the tick ran a merge that failed or whose gates failed, else 0.
"""

from __future__ import annotations

import signal
import sys

import click


@click.command()
@click.argument("spec")
@click.option("--once", is_flag=True, help="Run one tick and exit.")
@click.option("--interval", type=float, default=None, help="Seconds between ticks (overrides the spec's schedule).")
@click.option("--workers", type=int, default=None, help="Merge worker actors (overrides run.workers).")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray).")
def watch(spec: str, once: bool, interval: float | None, workers: int | None, address: str | None) -> None:
    """Merge new checkpoints as they land: each tick fingerprints the sources and runs the pipeline on new inputs."""
    from distmerge.production import Runtime, Scheduler, load_spec

    parsed = load_spec(spec)
    if interval is not None and interval <= 0:
        raise click.BadParameter(f"{interval} is not a positive number of seconds", param_hint="--interval")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # exit through finally blocks: lease released
    try:
        with Runtime(parsed, address=address, workers=workers) as runtime:
            result = Scheduler(parsed, runtime).watch(once=once, interval=interval)
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
        sys.exit(130)
    click.echo(f"{result.action}: {result.reason}")
    sys.exit(result.exit_code)
