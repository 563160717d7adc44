"""`distmerge merge RECIPE`, `distmerge plan RECIPE` and `distmerge methods`."""

from __future__ import annotations

import json

import click

from distmerge.cli.options import build_run_options, run_option_flags
from distmerge.options import RunOptions


@click.command()
@click.argument("recipe")
@click.option("--output", default=None, help="Override the recipe's output URL.")
@run_option_flags(RunOptions)
def merge(recipe: str, output: str | None, **flags) -> None:
    """Merge the checkpoints named in RECIPE (YAML) and publish the result atomically."""
    from distmerge.local_ray import started_early

    options = build_run_options(RunOptions, flags)
    with started_early(options) as local_ray:  # a local Ray (if not left to the lane to ask for) starts now
        from distmerge.allocator import keep_freed_memory
        from distmerge.merge import run_merge
        from distmerge.recipe import load_recipe

        parsed = load_recipe(recipe, {"output": output})
        if options.workers == 0 or (local_ray and options.merge_while_starting):
            keep_freed_memory()  # this process merges (see distmerge.allocator), with Ray while it starts
        result = run_merge(parsed, options)
    click.echo(f"published {result.output} ({result.num_blocks} shards, {result.output_bytes / 2**20:.1f} MiB, "
               f"plan {result.plan_hash}, {result.seconds:.1f}s"
               f"{f', {result.reused_blocks} reused' if result.reused_blocks else ''})")


@click.command()
@click.argument("recipe")
@click.option("--block-size", "block_size", default=None, help="Target bytes per block, e.g. 256MiB.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole plan as JSON.")
def plan(recipe: str, block_size: str | None, as_json: bool) -> None:
    """Show the plan of RECIPE (blocks, statistics passes) from headers only, without merging."""
    from distmerge.cli.options import parse_size
    from distmerge.merge import plan_recipe
    from distmerge.recipe import load_recipe

    options = RunOptions(**({"block_size": parse_size(block_size)} if block_size else {}))
    built, job = plan_recipe(load_recipe(recipe), options)
    if as_json:
        click.echo(json.dumps({"plan_hash": built.hash(), **built.to_json()}, indent=2))
        return
    click.echo(f"plan {built.hash()}: {len(built.tensors)} tensors, {len(built.blocks)} blocks, "
               f"{built.total_bytes / 2**20:.1f} MiB out, {built.num_layers} layers")
    click.echo(f"statistics passes: {', '.join(p.name for p in job.phases()) or 'none'}")
    for block in built.blocks:
        click.echo(f"  block {block.id}: {block.file} {len(block.tensors)} tensors {block.nbytes / 2**20:.1f} MiB")


@click.command()
def methods() -> None:
    """List merge methods with their parameters and defaults."""
    from distmerge.methods import get_method, method_names

    for name in method_names():
        method = get_method(name)
        click.echo(f"{name}: {method.doc.strip().splitlines()[0] if method.doc else ''}")
        for field_name, field in method.params_model.model_fields.items():
            click.echo(f"    {field.alias or field_name} = {field.default!r}  {field.description or ''}")
