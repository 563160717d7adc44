"""`distmerge testbed build --out URL`: the locally trained tiny model family for tests, demos, benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from distmerge.cli.options import storage_options_option


@click.group()
def testbed() -> None:
    """A family of real tiny language models (base, specialists, GRPO) trained on this machine."""


@testbed.command()
@click.option("--out", required=True, help="Where the family goes (local folder or any fsspec URL).")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="small", show_default=True,
              help="tiny: seconds, for tests; small: the demo family (~10 min on 2 cores).")
@click.option("--seed", default=0, show_default=True, help="Seed of the whole build.")
@click.option("--cache", type=click.Path(path_type=Path), default=Path(".cache/testbed"), show_default=True,
              help="Local build folder used when --out is remote (training writes local files).")
@storage_options_option
def build(out: str, size: str, seed: int, cache: Path, storage_options: dict) -> None:
    """Build the family (or reuse an identical cached build) and publish it to --out."""
    from distmerge.storage import Location, copy_tree
    from distmerge.testbed.family import MANIFEST_NAME, build_family

    dest = Location(out, storage_options)
    local = dest.local_path
    manifest = build_family(local if local is not None else cache / f"{size}-{seed}", size=size, seed=seed)
    if local is None:
        root = Location(str(manifest.root))
        for name in manifest.models:
            copy_tree(root.child(name), dest.child(name))
        dest.child(MANIFEST_NAME).write_bytes(root.child(MANIFEST_NAME).read_bytes())  # last: marks completion
    rows = [f"{name:<22} " + " ".join(f"{task}={acc:.2f}" for task, acc in sorted(info.get("accuracy", {}).items()))
            for name, info in manifest.models.items()]
    click.echo("\n".join(rows))
    click.echo(json.dumps({"out": dest.url, "build_seconds": manifest.build_seconds,
                           "gate_passed": manifest.gate.get("passed")}))
