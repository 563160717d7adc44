"""Scheduled merges: each tick looks at the sources, and runs the pipeline only for an input set not yet decided.

A tick: resolve the sources (list, index headers, fingerprint) -> wait if fewer than `min_models` are ready
-> do nothing if the ledger already holds a published or gate_failed run of this recipe on these exact
inputs (or `max_failures` failed ones) -> take the lease (another scheduler holds it: do nothing) -> look
at the ledger again (the previous holder may have just finished these inputs) -> run -> release. The lease
is renewed in the background while the run is in progress. The one-shot job (`run_once`) takes the same
lease, so a manual run never races a scheduler for `latest.json`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass

from distmerge.errors import DistmergeError
from distmerge.production.lease import Lease
from distmerge.production.ledger import Ledger, RunRecord
from distmerge.production.pipeline import RunResult, new_run_id, run_paths, run_pipeline, template_hash
from distmerge.production.runtime import Runtime
from distmerge.production.sources import Inputs, resolve_inputs
from distmerge.production.spec import PipelineSpec

log = logging.getLogger(__name__)


@dataclass
class TickResult:
    """What a tick did: ran (see `run`), waiting, already_done, gave_up, lease_held or skipped, and why."""

    action: str
    reason: str
    run: RunResult | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.run is not None and self.run.status in ("failed", "gate_failed") else 0


def recipe_hash(spec: PipelineSpec, inputs: Inputs) -> str:
    return template_hash(inputs.recipe(spec, run_paths(spec, "pending")[0]))


def make_lease(spec: PipelineSpec, owner: str | None = None) -> Lease:
    return Lease(spec.lease_url, spec.lease.expiry_seconds, spec.storage_options, owner)


class Scheduler:
    """Ticks of one spec; keeps its `Runtime` (Ray, actor pools) across ticks."""

    def __init__(self, spec: PipelineSpec, runtime: Runtime, owner: str | None = None):
        self.spec = spec
        self.runtime = runtime
        self.ledger = Ledger(spec.ledger_url, spec.storage_options)
        self.lease = make_lease(spec, owner)

    def tick(self) -> TickResult:
        spec = self.spec
        inputs = resolve_inputs(spec)
        if len(inputs.models) < spec.merge.min_models:
            return self._report(TickResult("waiting", f"{inputs.describe()}; waiting for at least "
                                           f"{spec.merge.min_models} ready checkpoints"))
        key = (spec.name, recipe_hash(spec, inputs), inputs.fingerprints.digest)
        done = self._decided(*key, inputs)
        if done is not None:
            return self._report(done)
        if not self.lease.acquire():
            current = self.lease.current()
            return self._report(TickResult("lease_held", f"{inputs.describe()}; lease held by "
                                           f"{current.describe() if current else 'another scheduler'}"))
        try:
            with self.lease.keep_alive():
                done = self._decided(*key, inputs)  # the previous holder may have finished these inputs
                if done is not None:
                    self._record_skip(inputs, key[1], done.reason)
                    return self._report(TickResult("skipped", done.reason))
                run = run_pipeline(spec, self.runtime, inputs=inputs, lease=self.lease)
        finally:
            self.lease.release()
        return self._report(TickResult("ran", f"{inputs.describe()}; {run.describe()}", run))

    def _decided(self, pipeline: str, recipe: str, fingerprints: str, inputs: Inputs) -> TickResult | None:
        row = self.ledger.decided(pipeline, recipe, fingerprints)
        if row is not None:
            return TickResult("already_done", f"{inputs.describe()}; already {row['status']} by run "
                              f"{row['run_id']}: nothing to do")
        failures = self.ledger.failures(pipeline, recipe, fingerprints)
        if failures >= self.spec.max_failures:
            return TickResult("gave_up", f"{inputs.describe()}; {failures} runs on these inputs failed "
                              f"(max_failures {self.spec.max_failures}): waiting for new inputs. Fix: see "
                              f"`distmerge runs {self.spec.ledger_url} --status failed`")
        return None

    def _record_skip(self, inputs: Inputs, recipe: str, reason: str) -> None:
        now = dt.datetime.now(dt.UTC)
        self.ledger.append(RunRecord(
            run_id=new_run_id(inputs, now), pipeline=self.spec.name, started_at=now, finished_at=now,
            status="skipped", recipe_hash=recipe, fingerprint_set=inputs.fingerprints.digest,
            fingerprints=inputs.fingerprints.to_json(), metrics=json.dumps({"reason": reason})))

    @staticmethod
    def _report(result: TickResult) -> TickResult:
        log.info("tick: %s: %s", result.action, result.reason)
        return result

    def watch(self, *, once: bool = False, interval: float | None = None) -> TickResult:
        """Tick now, then on the schedule (or every `interval` seconds); `once` returns after one tick."""
        cron = self.spec.schedule.parsed_cron() if self.spec.schedule and interval is None else None
        interval = interval or (self.spec.schedule.interval_seconds if self.spec.schedule else None)
        if not once and cron is None and interval is None:
            raise DistmergeError(f"spec {self.spec.name} has no schedule. Fix: add schedule: {{interval_seconds: "
                                 "300}} (or cron: '*/5 * * * *') to the spec, or pass --interval SECONDS")
        while True:
            started = time.time()
            if once:
                return self.tick()
            try:
                self.tick()
            except Exception:  # a storage outage or a bad upload must not end a long-running scheduler
                log.exception("tick failed; trying again at the next one")
            if cron is not None:
                wake = cron.next_after(dt.datetime.now(dt.UTC)).timestamp()
            else:
                wake = started + interval
            log.info("next tick at %s", time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(wake)))
            time.sleep(max(0.0, wake - time.time()))


def run_once(spec: PipelineSpec, runtime: Runtime, owner: str | None = None) -> RunResult:
    """The one-shot job: resolve the sources and run the pipeline under the spec's lease, whatever the ledger says."""
    inputs = resolve_inputs(spec)
    if len(inputs.models) < spec.merge.min_models:
        raise DistmergeError(f"spec {spec.name}: {inputs.describe()}; fewer than min_models "
                             f"({spec.merge.min_models}). Fix: upload the checkpoints or lower merge.min_models")
    lease = make_lease(spec, owner)
    if not lease.acquire():
        current = lease.current()
        raise DistmergeError(f"lease {spec.lease_url} is held by {current.describe() if current else 'another run'}. "
                             "Fix: wait for that run to finish (or for the lease to expire), then run again")
    try:
        with lease.keep_alive():
            return run_pipeline(spec, runtime, inputs=inputs, lease=lease)
    finally:
        lease.release()
