"""`distmerge runs LEDGER_URL`: list the runs recorded by pipelines and schedulers, newest first.

    distmerge runs s3://bucket/published/agents/ledger
    distmerge runs s3://bucket/published/agents/ledger --status published --limit 5
    distmerge runs runs/production/ledger --json
"""

from __future__ import annotations

import json

import click

from distmerge.cli.options import storage_options_option
from distmerge.production.ledger import STATUSES


def _merged_accuracy(row: dict) -> str:
    metrics = json.loads(row["metrics"]) if row.get("metrics") else {}
    accuracy = (metrics.get("accuracy") or {}).get("merged") or {}
    return " ".join(f"{task}={value:.3f}" for task, value in accuracy.items()) or "-"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(rows: list[dict]) -> str:
    header = ("RUN", "PIPELINE", "STATUS", "STARTED (UTC)", "MERGE S", "EVAL S", "MERGED ACCURACY", "OUTPUT / ERROR")
    lines = [header]
    for row in rows:
        lines.append((row["run_id"], row["pipeline"], row["status"], f"{row['started_at']:%Y-%m-%d %H:%M:%S}",
                      _seconds(row["merge_seconds"]), _seconds(row["eval_seconds"]), _merged_accuracy(row),
                      row["error"] or row["output_url"] or "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + line[-1]
                     for line in lines)


def _json_row(row: dict) -> dict:
    out = dict(row)
    for column in ("fingerprints", "metrics"):
        out[column] = json.loads(row[column]) if row.get(column) else None
    for column in ("started_at", "finished_at"):
        out[column] = row[column].isoformat() if row.get(column) else None
    return out


@click.command()
@click.argument("ledger_url")
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only runs with this status.")
@click.option("--pipeline", default=None, help="Only runs of this pipeline (spec name).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the N newest runs.")
@click.option("--json", "as_json", is_flag=True, help="One JSON list with every column (metrics, fingerprints).")
@storage_options_option
def runs(ledger_url: str, status: str | None, pipeline: str | None, limit: int | None, as_json: bool,
         storage_options: dict) -> None:
    """List pipeline runs recorded in the ledger at LEDGER_URL (a Parquet dataset, any fsspec URL)."""
    from distmerge.production import Ledger

    rows = Ledger(ledger_url, storage_options).read(status=status, pipeline=pipeline, limit=limit)
    if as_json:
        click.echo(json.dumps([_json_row(row) for row in rows], indent=2))
    elif not rows:
        click.echo(f"no runs in {ledger_url}" + (f" with status {status}" if status else ""))
    else:
        click.echo(format_table(rows))
