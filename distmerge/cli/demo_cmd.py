"""`distmerge demo`: the end-to-end demonstration that `make demo` runs."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Folder for merged models and the report.")
@click.option("--workers", default=2, show_default=True, help="Ray merge actors.")
@click.option("--actors", default=2, show_default=True, help="vLLM engine actors for the evaluation.")
@click.option("--n-per-task", default=300, show_default=True, help="Held-out prompts per task.")
def demo(out: Path, workers: int, actors: int, n_per_task: int) -> None:
    """Build the testbed, merge it six ways on Ray, transfer a reasoning vector, evaluate with vLLM."""
    from distmerge.demo import run_demo

    run_demo(out, workers=workers, n_per_task=n_per_task, actors=actors)
