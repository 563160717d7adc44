"""`distmerge demo`: the end-to-end demonstration that `make demo` runs."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Folder for the demo's models, outputs and report.")
def demo(out: Path) -> None:
    """Run distmerge end to end on locally built models (local files, local Ray)."""
    from distmerge.demo import run_demo

    run_demo(out)
