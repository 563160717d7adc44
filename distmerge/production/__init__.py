"""Production pipelines: merge -> evaluate -> gate -> publish as one job, and scheduled merges of new checkpoints.

The modules read as the flow: `spec` (one YAML for the job and the scheduler) -> `sources` (globs over object
storage -> ready checkpoints) and `fingerprint` (listings + headers) -> `scheduler` (ticks, `lease` so that two
schedulers never run the same merge) -> `pipeline` (merge on Ray, evaluate with vLLM, gates) -> `publish`
(atomic `latest.json`) and `ledger` (one Parquet row per run). Importing this package imports neither Ray
nor vLLM.
"""

from distmerge.production.lease import Lease
from distmerge.production.ledger import STATUSES, Ledger, RunRecord
from distmerge.production.pipeline import RunResult, run_pipeline
from distmerge.production.publish import promote, read_pointer
from distmerge.production.runtime import Runtime
from distmerge.production.scheduler import Scheduler, TickResult, run_once
from distmerge.production.sources import Inputs, resolve_inputs
from distmerge.production.spec import PipelineSpec, load_spec, parse_spec

__all__ = [
    "STATUSES", "Inputs", "Lease", "Ledger", "PipelineSpec", "RunRecord", "RunResult", "Runtime", "Scheduler",
    "TickResult", "load_spec", "parse_spec", "promote", "read_pointer", "resolve_inputs", "run_once",
    "run_pipeline",
]
