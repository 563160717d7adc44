"""Run a recipe end to end: index inputs, plan, statistics passes, merge blocks, commit with provenance.

The driver never touches tensor bytes beyond headers: executors (this process, or Ray actors) read their
own ranges and write their own shards under the staging prefix; the driver sums small statistics, collects
shard records and commits (index last). `--resume` reuses staged statistics and verified shards.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from distmerge.checkpoint import CheckpointIndex
from distmerge.merge_core import MergeJob, reduce_phase
from distmerge.options import RunOptions, resolve_device
from distmerge.plan import Plan, build_plan
from distmerge.provenance import MODEL_CARD_NAME, PROVENANCE_NAME, build_provenance, model_card
from distmerge.recipe import Recipe
from distmerge.staging import StagingState, json_safe
from distmerge.storage import Location
from distmerge.writer import CheckpointWriter

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    output: str
    plan_hash: str
    num_blocks: int
    reused_blocks: int
    output_bytes: int
    seconds: float
    stats: dict[str, Any]


def load_indexes(recipe: Recipe) -> dict[str, CheckpointIndex]:
    """Index every input in parallel (headers only); roles: base, target, model:<name>."""
    urls = {"base": recipe.base, "target": recipe.target_url, **{f"model:{m.name}": m.path for m in recipe.models}}
    unique = sorted(set(urls.values()))
    with ThreadPoolExecutor(min(8, len(unique))) as pool:
        loaded = dict(zip(unique, pool.map(lambda u: CheckpointIndex.load(u, recipe.storage_options), unique),
                          strict=True))
    return {role: loaded[url] for role, url in urls.items()}


def plan_recipe(recipe: Recipe, options: RunOptions) -> tuple[Plan, MergeJob]:
    indexes = load_indexes(recipe)
    models = {m.name: indexes[f"model:{m.name}"] for m in recipe.models}
    plan = build_plan(indexes["base"], models, indexes["target"], out_dtype=recipe.dtype,
                      block_size=options.block_size, recipe=recipe.canonical())
    job = MergeJob(plan, indexes, recipe.method, dict(recipe.params), recipe.seed, recipe.schedule,
                   weights=[m.weight for m in recipe.models])
    return plan, job


def run_merge(recipe: Recipe, options: RunOptions | None = None, *, write_delta: bool = False,
              pool=None) -> MergeResult:
    """Merge and publish. `write_delta` publishes the merged vector itself (vector extract); `pool` (a
    `distmerge.worker_pool.WorkerPool`) reuses Ray actors across merges in long-running drivers."""
    options = options or RunOptions()
    start = time.perf_counter()
    plan, job = plan_recipe(recipe, options)
    job.write_delta = write_delta
    output = Location(recipe.output, recipe.storage_options)
    inputs = [recipe.base, recipe.target_url, *(m.path for m in recipe.models)]
    writer = CheckpointWriter(output, overwrite=options.overwrite, protected=inputs)
    state = StagingState(writer.staging, plan)
    state.prepare(options.resume)
    device = resolve_device(options.device)
    executor = _make_executor(job, writer.staging, options, device, pool)
    try:
        stats, reused, records = _execute(job, state, executor, options)
    except BaseException:
        executor.close()
        raise
    # Stopping the workers (and a local Ray) takes a second or two of waiting: overlap it with the commit.
    closing = threading.Thread(target=_close, args=(executor,), name="distmerge-close")
    closing.start()
    try:
        result = _publish(recipe, options, plan, job, writer, stats, reused, records, write_delta, device, start,
                          executor.run_info())
    finally:
        closing.join()
    log.info("merged %s in %.1fs (%d blocks, %d reused)", recipe.output, result.seconds, len(plan.blocks), reused)
    return result


def _close(executor) -> None:
    try:
        executor.close()
    except Exception:  # the merge's outcome does not depend on it; say so and go on
        log.warning("stopping the merge workers failed", exc_info=True)


def _publish(recipe: Recipe, options: RunOptions, plan: Plan, job: MergeJob, writer: CheckpointWriter,
             stats: dict[str, Any], reused: int, records: dict, write_delta: bool, device: str,
             start: float, executor_info: dict[str, int]) -> MergeResult:
    """Provenance, model card and the atomic commit (index last)."""
    run_info = {"kind": "vector" if write_delta else "merge", "workers": options.workers, "device": device,
                "block_size": options.block_size, "seconds": round(time.perf_counter() - start, 3),
                "reused_blocks": reused, **executor_info}
    provenance = build_provenance(recipe.canonical(), plan, json_safe(stats), run_info)
    writer.stage_file(PROVENANCE_NAME, (json.dumps(provenance, indent=2) + "\n").encode())
    writer.stage_file(MODEL_CARD_NAME, model_card(provenance).encode())
    aux = writer.stage_aux_from(job.indexes["target"].location, _config_updates(recipe))
    writer.commit(list(records.values()), [*aux, PROVENANCE_NAME, MODEL_CARD_NAME],
                  check_hash=options.verify == "checksum", metadata={"distmerge_plan": plan.hash()})
    seconds = time.perf_counter() - start
    return MergeResult(writer.output.url, plan.hash(), len(plan.blocks), reused, plan.total_bytes, seconds, stats)


def _execute(job: MergeJob, state: StagingState, executor, options: RunOptions):
    plan = job.plan
    phases = job.phases()
    stats = state.load_stats() if options.resume else None
    done = state.completed(check_hash=options.verify == "checksum") if options.resume else {}
    todo = [b for b in plan.blocks if b.id not in done]
    passes = (len(phases) if stats is None else 0) + 1
    total = (passes - 1) * plan.total_bytes + sum(b.nbytes for b in todo)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not options.progress,
              desc="merge", dynamic_ncols=True) as bar:
        if stats is None:
            stats = {}
            for i, phase in enumerate(phases):
                bar.set_description(f"stats {i + 1}/{len(phases)} ({phase.name})")
                partials = executor.map_phase(i, stats, plan.blocks, bar.update)
                stats.update(reduce_phase(job, i, partials))
            state.save_stats(stats)
        bar.set_description("merge")
        written = [len(done)]

        def advance(nbytes: int) -> None:
            written[0] += 1
            bar.set_postfix_str(f"{written[0]}/{len(plan.blocks)} blocks", refresh=False)
            bar.update(nbytes)

        records = {**done, **executor.write_blocks(todo, stats, advance)}
    return stats, len(done), records


def _make_executor(job: MergeJob, staging: Location, options: RunOptions, device: str, pool=None):
    if options.workers == 0:
        from distmerge.execute_local import LocalExecutor
        from distmerge.options import worker_threads

        return LocalExecutor(job, staging, device, worker_threads(options, local=False))
    from distmerge.execute_ray import RayExecutor

    return RayExecutor(job, staging, options, device, pool)


def _config_updates(recipe: Recipe) -> dict[str, Any]:
    return {} if recipe.dtype == "auto" else {"torch_dtype": recipe.dtype, "dtype": recipe.dtype}
