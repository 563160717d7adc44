"""The run ledger: one row per pipeline run, as a Parquet dataset under a prefix in object storage.

Object stores cannot append, so each run writes its own file `<ledger>/<run-id>.parquet` (locally through a
hidden temporary name and a rename; on object stores one PUT) and reading scans the prefix with
`pyarrow.dataset`, which skips names starting with `.` or `_`. Run ids start with the UTC start time, so file
names sort by time. JSON columns (fingerprints, metrics) keep the schema fixed while their content varies.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from distmerge.production.publish import write_atomic
from distmerge.storage import Location, translate_errors

# merged: built and evaluated, not promoted (publish.promote: false); published: gates passed, latest.json moved;
# gate_failed: evaluated, a gate failed; failed: an error stopped the run; skipped: the scheduler found,
# once it held the lease, that another scheduler had just finished the same inputs.
STATUSES = ("merged", "published", "gate_failed", "failed", "skipped")
DONE_STATUSES = ("published", "gate_failed")  # a decision was reached: the scheduler does not run these again

SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("pipeline", pa.string()),
    ("started_at", pa.timestamp("ms", tz="UTC")),
    ("finished_at", pa.timestamp("ms", tz="UTC")),
    ("status", pa.string()),
    ("recipe_hash", pa.string()),
    ("fingerprint_set", pa.string()),
    ("fingerprints", pa.string()),
    ("merge_seconds", pa.float64()),
    ("eval_seconds", pa.float64()),
    ("publish_seconds", pa.float64()),
    ("metrics", pa.string()),
    ("output_url", pa.string()),
    ("error", pa.string()),
])


@dataclass
class RunRecord:
    """One ledger row; `fingerprints` and `metrics` are JSON text."""

    run_id: str
    pipeline: str
    started_at: dt.datetime
    finished_at: dt.datetime
    status: str
    recipe_hash: str
    fingerprint_set: str
    fingerprints: str = "{}"
    merge_seconds: float | None = None
    eval_seconds: float | None = None
    publish_seconds: float | None = None
    metrics: str = "{}"
    output_url: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")

    def row(self) -> dict[str, Any]:
        return asdict(self)


class Ledger:
    """Append-only runs under one prefix; `read` returns rows newest first."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.root = Location(url, storage_options)

    def append(self, record: RunRecord) -> str:
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([record.row()], schema=SCHEMA), buffer)
        target = self.root.child(f"{record.run_id}.parquet")
        write_atomic(target, buffer.getvalue())
        return target.url

    def table(self, status: str | None = None, pipeline: str | None = None) -> pa.Table:
        import pyarrow.dataset as ds

        if not self.root.exists():
            return SCHEMA.empty_table()
        fs = self.root.fs
        with translate_errors(self.root.url, "read the ledger at"):
            fs.invalidate_cache(self.root.path)  # other schedulers append: never trust a cached listing
            dataset = ds.dataset(self.root.path, format="parquet", filesystem=fs, schema=SCHEMA)
            condition = None
            for column, value in (("status", status), ("pipeline", pipeline)):
                if value is not None:
                    term = ds.field(column) == value
                    condition = term if condition is None else condition & term
            table = dataset.to_table(filter=condition)
        return table.sort_by([("started_at", "descending"), ("run_id", "descending")])

    def read(self, status: str | None = None, pipeline: str | None = None,
             limit: int | None = None) -> list[dict[str, Any]]:
        rows = self.table(status, pipeline).to_pylist()
        return rows[:limit] if limit is not None else rows

    def decided(self, pipeline: str, recipe_hash: str, fingerprint_set: str) -> dict[str, Any] | None:
        """The newest published/gate_failed run of exactly these inputs and recipe, if any."""
        for row in self.read(pipeline=pipeline):
            if (row["recipe_hash"], row["fingerprint_set"]) == (recipe_hash, fingerprint_set) \
                    and row["status"] in DONE_STATUSES:
                return row
        return None

    def failures(self, pipeline: str, recipe_hash: str, fingerprint_set: str) -> int:
        return sum(1 for row in self.read(status="failed", pipeline=pipeline)
                   if (row["recipe_hash"], row["fingerprint_set"]) == (recipe_hash, fingerprint_set))

