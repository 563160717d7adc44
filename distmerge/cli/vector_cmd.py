"""`distmerge vector extract A B --out URL` and `distmerge vector stats URL...`."""

from __future__ import annotations

import json

import click

from distmerge.cli.options import storage_options_option


@click.group()
def vector() -> None:
    """Task, reasoning and skill vectors as artifacts."""


@vector.command()
@click.argument("a")
@click.argument("b")
@click.option("--out", required=True, help="URL for the vector A - B (a checkpoint-shaped artifact).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Stored dtype (fp32 keeps the tiny entries RL updates are made of).")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact at --out.")
@storage_options_option
def extract(a: str, b: str, out: str, dtype: str, overwrite: bool, storage_options: dict) -> None:
    """Write the vector A - B (e.g. GRPO - SFT, a reasoning vector) to --out."""
    from distmerge.options import RunOptions
    from distmerge.vectors import extract_vector

    result = extract_vector(a, b, out, dtype=dtype, storage_options=storage_options,
                            options=RunOptions(overwrite=overwrite))
    click.echo(f"wrote {result.output} ({result.num_blocks} shards, {result.output_bytes / 2**20:.1f} MiB)")


@vector.command()
@click.argument("urls", nargs=-1, required=True)
@click.option("--base", default=None, help="Treat URLS as models and report URL - BASE instead.")
@click.option("--eps", default=1e-5, show_default=True, help="An entry is active when |delta| > eps.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@storage_options_option
def stats(urls: tuple[str, ...], base: str | None, eps: float, as_json: bool, storage_options: dict) -> None:
    """Norms, sparsity and pairwise overlap of vectors, per tensor kind."""
    from distmerge.vectors import format_stats, vector_stats

    result = vector_stats(list(urls), base=base, eps=eps, storage_options=storage_options)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else format_stats(result))
