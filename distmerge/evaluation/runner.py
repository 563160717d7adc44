"""`evaluate_models`: every model on every suite, greedy, data parallel over vLLM engine actors.

Key decisions:
- Work is split into units (model, shard): each model's prompts are cut into interleaved shards, enough that
  every actor has work when there are fewer models than actors, and small enough (PROMPTS_PER_UNIT) for
  progress to move. Interleaving balances suites with different decoding budgets across shards.
- The prompt list goes to the object store once; a unit names it and its shard.
- Scheduling keeps one unit in flight per actor (`ray.wait`, never `ray.get` in a loop) and hands an idle
  actor a unit of the model it already holds when there is one, so engines are rarely swapped.
- Scoring happens on the driver from the returned texts, with each suite's own rule.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from distmerge.errors import DistmergeError
from distmerge.evaluation.engine import EnginePool
from distmerge.evaluation.gates import Roles, resolve_roles
from distmerge.evaluation.options import EvalOptions
from distmerge.evaluation.report import EvalReport
from distmerge.evaluation.suites import Example, Suite, parse_suite
from distmerge.storage import Location

logger = logging.getLogger(__name__)

PROMPTS_PER_UNIT = 1024


def _validate(models: Mapping[str, str], suites: Sequence[Suite]) -> None:
    if not models:
        raise DistmergeError("no models to evaluate. Fix: give at least one --model NAME=URL")
    if not suites:
        raise DistmergeError("no suites to evaluate on. Fix: give at least one --suite")
    owner: dict[str, str] = {}
    for suite in suites:
        for task in suite.tasks:
            if task in owner:
                raise DistmergeError(f"task {task!r} appears in suites {owner[task]!r} and {suite.name!r}. "
                                     "Fix: give the user suite another name or a distinct 'task' field")
            owner[task] = suite.name


def _units(models: Mapping[str, str], num_prompts: int, num_actors: int) -> list[tuple[str, int, int]]:
    """(model, shard, num_shards) work units, grouped by model."""
    shards = max(math.ceil(num_actors / len(models)), math.ceil(num_prompts / PROMPTS_PER_UNIT))
    return [(name, shard, shards) for name in models for shard in range(shards)]


def _run_units(pool: EnginePool, models: Mapping[str, Location], units: list[tuple[str, int, int]], prompts_ref,
               num_prompts: int, progress: bool) -> dict[tuple[str, int, int], dict]:
    import ray
    from tqdm.auto import tqdm

    pending = list(units)
    holds: dict[int, str | None] = dict.fromkeys(range(len(pool.actors)))
    in_flight: dict[Any, tuple[int, tuple[str, int, int]]] = {}
    results = {}
    with tqdm(total=num_prompts * len(models), desc="eval prompts", unit="prompt", disable=not progress) as bar:
        while pending or in_flight:
            for actor in [a for a in holds if a not in {slot for slot, _ in in_flight.values()}]:
                if not pending:
                    break
                unit = next((u for u in pending if u[0] == holds[actor]), pending[0])
                pending.remove(unit)
                holds[actor] = unit[0]
                ref = pool.actors[actor].generate.remote(models[unit[0]], prompts_ref, unit[1], unit[2])
                in_flight[ref] = (actor, unit)
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            actor, unit = in_flight.pop(done)
            try:
                results[unit] = ray.get(done)
            except ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                raise DistmergeError(f"evaluating model {unit[0]!r} ({models[unit[0]]}) failed in its engine: "
                                     f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:500]}. Fix: "
                                     "run `distmerge eval --load-check` on it; check the URL and the config") from exc
            bar.update(len(results[unit]["texts"]))
            logger.debug("%s shard %d/%d done on actor %d", unit[0], unit[1] + 1, unit[2], actor)
    return results


def evaluate_models(models: Mapping[str, str], suites: Sequence[Suite | str], options: EvalOptions | None = None, *,
                    roles: Roles | None = None, storage_options: Mapping[str, Any] | None = None,
                    pool: EnginePool | None = None) -> EvalReport:
    """Greedy accuracy of each model (name -> checkpoint URL) on each suite, with vLLM engines in Ray actors.

    Suites are `Suite`s or their CLI spellings (`"testbed:addition"`, `"gsm8k=s3://b/gsm8k.jsonl"`).
    `pool` reuses running engine actors (a sweep, a test session); without it a pool is started and closed
    here. `roles` defaults to the naming conventions of `gates.resolve_roles`.
    """
    import ray

    options = options or EvalOptions()
    models = dict(models)
    suites = [parse_suite(s, storage_options=storage_options) if isinstance(s, str) else s for s in suites]
    _validate(models, suites)
    examples: list[tuple[Suite, int, Example]] = [(s, i, e) for s in suites for i, e in enumerate(s.examples)]
    prompts = [(example.prompt, suite.max_tokens) for suite, _, example in examples]
    owned = pool is None
    pool = pool or EnginePool(options)
    checkpoints = {name: Location(url, storage_options) for name, url in models.items()}
    start = time.perf_counter()
    num_actors, settings = len(pool.actors), pool.settings  # read before an owned pool is closed
    try:
        units = _units(models, len(prompts), len(pool.actors))
        logger.info("evaluating %d models on %d prompts (%s) with %d actors", len(models), len(prompts),
                    ", ".join(s.name for s in suites), len(pool.actors))
        results = _run_units(pool, checkpoints, units, ray.put(prompts), len(prompts), options.progress)
    finally:
        if owned:
            pool.close()
    seconds = time.perf_counter() - start
    rows = _score(models, examples, results)
    tasks = [task for suite in suites for task in suite.tasks]
    report = EvalReport(
        models=models, rows=rows,
        suites=[{"name": s.name, "source": s.source, "tasks": s.tasks, "max_tokens": s.max_tokens,
                 "num_examples": len(s.examples)} for s in suites],
        roles=roles or resolve_roles(list(models), tasks),
        meta={"device": settings.device, "dtype": settings.llm_kwargs["dtype"],
              "num_actors": num_actors, "seconds": round(seconds, 2),
              "prompts_per_second": len(prompts) * len(models) / seconds,
              "generate_seconds": sum(r["generate_seconds"] for r in results.values()),
              "load_seconds": sum(r["load_seconds"] for r in results.values())})
    logger.info("evaluated %d prompts x %d models in %.1fs", len(prompts), len(models), seconds)
    return report


def _score(models: Mapping[str, str], examples: list[tuple[Suite, int, Example]],
           results: dict[tuple[str, int, int], dict]) -> list[dict[str, Any]]:
    rows = []
    for (model, shard, num_shards), result in sorted(results.items()):
        indices = range(shard, len(examples), num_shards)
        for index, text, num_tokens in zip(indices, result["texts"], result["num_tokens"], strict=True):
            suite, number, example = examples[index]
            prediction = suite.predict(example, text)
            rows.append({"model": model, "suite": suite.name, "task": example.task, "example": number,
                         "prompt": example.prompt, "answer": example.answer, "completion": text,
                         "prediction": prediction, "correct": suite.is_correct(example, prediction),
                         "num_tokens": num_tokens, "_order": (list(models).index(model), index)})
    rows.sort(key=lambda row: row["_order"])
    for row in rows:
        del row["_order"]
    return rows
