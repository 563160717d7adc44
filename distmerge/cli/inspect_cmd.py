"""`distmerge inspect URL`: what a checkpoint holds, read from its headers only."""

from __future__ import annotations

import json

import click

from distmerge.cli.options import storage_options_option


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def _human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_summary(summary: dict) -> str:
    total = summary["num_parameters"] or 1
    dtypes = ", ".join(f"{d} {100 * c / total:.1f}%" for d, c in sorted(summary["dtypes"].items()))
    lines = [
        f"checkpoint     {summary['url']}",
        f"architecture   {summary['architecture']}",
        f"parameters     {_human_count(summary['num_parameters'])} ({summary['num_parameters']:,})",
        f"tensors        {summary['num_tensors']}",
        f"layers         {summary['num_layers']}",
        f"dtypes         {dtypes}",
        f"size           {_human_bytes(summary['total_bytes'])} of tensor data",
        f"tied embedding {'yes' if summary['tied_embeddings'] else 'no'}",
        f"embeddings     {', '.join(summary['embeddings']) or '-'}",
        f"lm_head        {', '.join(summary['lm_head']) or '- (tied or absent)'}",
        f"final norm     {', '.join(summary['final_norm']) or '-'}",
        f"shards         {len(summary['shards'])}",
    ]
    for name, info in sorted(summary["shards"].items()):
        lines.append(f"  {name}  {_human_bytes(info['size'])}, {info['num_tensors']} tensors")
    return "\n".join(lines)


@click.command()
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@storage_options_option
def inspect(url: str, as_json: bool, storage_options: dict) -> None:
    """Summarise the checkpoint at URL (local path or any fsspec URL) without loading it."""
    from distmerge.checkpoint import CheckpointIndex

    summary = CheckpointIndex.load(url, storage_options).summary()
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
