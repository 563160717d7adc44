"""The end-to-end demo behind `make demo`: everything distmerge does, on embedded defaults, on this machine.

1. Build (or reuse, by content hash) the testbed family: a base, four task specialists and a GRPO pair,
   real tiny Qwen2 models trained on the CPU.
2. Merge the specialists on a local Ray (two worker actors, reused across merges) with task arithmetic, TIES,
   DARE-TIES, RAM, RAM+ and RAM+ with LiNeS, and transfer a reasoning vector (GRPO - weak SFT on reversal)
   onto the reversal specialist. The recipes are the examples in pipelines/recipes/.
3. Evaluate every model with vLLM engines in Ray actors (greedy, held-out hard prompts) and write
   runs/demo/report.md, report.json, results.parquet and chart.png; print the table.
A merge that does not beat the base on every task is reported as such (the demo exits non-zero), never hidden.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import click

RECIPES = Path(__file__).resolve().parents[1] / "pipelines" / "recipes"
DEMO_MERGES = ("task_arithmetic", "ties", "dare_ties", "ram", "ram_plus", "ram_plus_lines")
TRANSFER = "reasoning_vector"
TESTBED_URL = "runs/testbed/small"  # where the example recipes expect the family


@contextlib.contextmanager
def _stage(title: str) -> Iterator[list[str]]:
    """Times a stage; the body appends a one-line result to the yielded list."""
    start = time.perf_counter()
    detail: list[str] = []
    yield detail
    click.echo(f"[{time.perf_counter() - start:6.1f}s] {title}: {' '.join(detail)}")


def build_testbed():
    from distmerge.testbed.family import build_family

    return build_family(TESTBED_URL, size="small", seed=0)


def run_merges(out: Path, workers: int) -> dict[str, str]:
    """Every demo recipe on one pool of Ray actors; returns name -> output path."""
    from distmerge.merge import run_merge
    from distmerge.options import RunOptions
    from distmerge.recipe import load_recipe
    from distmerge.worker_pool import WorkerPool

    options = RunOptions(workers=workers, cpus_per_worker=1.0, overwrite=True, progress=False)
    pool = WorkerPool(options, "cpu")
    outputs = {}
    try:
        for name in (*DEMO_MERGES, TRANSFER):
            recipe = load_recipe(RECIPES / f"{name}.yaml", {"output": str(out / "merges" / name)})
            result = run_merge(recipe, options, pool=pool)
            click.echo(f"         {name:<18} {result.num_blocks} shards, plan {result.plan_hash}, "
                       f"{result.seconds:.1f}s")
            outputs[name] = result.output
    finally:
        pool.close()
    return outputs


def evaluate(models: dict[str, str], inputs: list[str], tasks: list[str], out: Path, n_per_task: int, actors: int):
    from distmerge.evaluation.gates import resolve_roles
    from distmerge.evaluation.options import EvalOptions
    from distmerge.evaluation.report import write_report
    from distmerge.evaluation.runner import evaluate_models
    from distmerge.evaluation.suites import testbed_suite

    # The GRPO pair are inputs (of the transfer), not merges: without this they would be reported as merged.
    roles = resolve_roles(list(models), tasks, inputs=inputs)
    report = evaluate_models(models, [testbed_suite(n_per_task=n_per_task, seed=1)],
                             EvalOptions(num_actors=actors, progress=True), roles=roles)
    write_report(report, str(out))
    return report


def check_merges_beat_base(report, merges: list[str]) -> list[str]:
    accuracy = report.accuracy()
    base = accuracy["base"]
    return [f"{m} on {task}: {accuracy[m][task]:.3f} <= base {base[task]:.3f}"
            for m in merges for task in base if accuracy[m][task] <= base[task]]


def describe_transfer(report, target: str, task: str) -> str:
    """The reasoning-vector transfer against its target, in words: it may help or hurt, and the demo says which."""
    accuracy = report.accuracy()
    moved = accuracy[TRANSFER][task] - accuracy[target][task]
    return (f"{TRANSFER}: {task} {accuracy[target][task]:.3f} ({target}) -> {accuracy[TRANSFER][task]:.3f} "
            f"after adding grpo-reversal - sft-weak-reversal ({moved:+.3f})")


def run_demo(out: Path, *, workers: int = 2, n_per_task: int = 300, actors: int = 2) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with _stage("testbed family (small)") as done:
        manifest = build_testbed()
        done.append(f"{len(manifest.models)} models in {manifest.root} (built in {manifest.build_seconds:.0f}s)")
    family = {name: str(manifest.path(name)) for name in manifest.models}
    with _stage(f"merges on local Ray ({workers} workers)") as done:
        merged = run_merges(out, workers)
        done.append(f"{len(merged)} published")
    models = {"base": family["base"], **{f"sft-{t}": family[f"sft-{t}"] for t in manifest.tasks},
              "sft-weak-reversal": family["sft-weak-reversal"], "grpo-reversal": family["grpo-reversal"], **merged}
    title = f"vLLM evaluation ({len(models)} models x {len(manifest.tasks)} tasks x {n_per_task} prompts)"
    with _stage(title) as done:
        report = evaluate(models, ["sft-weak-reversal", "grpo-reversal"], list(manifest.tasks), out, n_per_task,
                          actors)
        done.append(f"report in {out}")
    click.echo((out / "report.md").read_text())
    click.echo(describe_transfer(report, "sft-reversal", "reversal"))
    failures = check_merges_beat_base(report, list(DEMO_MERGES))
    (out / "demo.json").write_text(json.dumps({"models": models, "merges_below_base": failures}, indent=2))
    if failures:
        raise click.ClickException("merges did not beat the base on every task:\n  " + "\n  ".join(failures))
    click.echo(f"every merge beats the base on every task; outputs in {out}")
