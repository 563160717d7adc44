"""`distmerge eval`: benchmark checkpoints with vLLM engines in Ray actors, write reports, apply gates.

    distmerge eval --family runs/testbed --model merged=s3://bucket/merges/ties --suite testbed \\
        --n-per-task 500 --gate 'merged>=0.9*specialist' --out runs/eval-ties
    distmerge eval --model base=s3://b/qwen --model merged=s3://b/merge \\
        --suite gsm8k=s3://b/gsm8k.jsonl --regex 'gsm8k=#### (-?[0-9.,]+)' --out s3://b/eval
    distmerge eval --model merged=runs/merge --load-check

Exit status: 0 when everything passed, 1 when a gate or the load check failed (after the report is written),
2 for bad input.
"""

from __future__ import annotations

import sys

import click

from distmerge.cli.options import build_run_options, run_option_flags, storage_options_option
from distmerge.evaluation.options import EvalOptions


def _pairs(values: tuple[str, ...], what: str, example: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise click.BadParameter(f"{value!r} is not {what}; write e.g. {example}")
        out[key] = rest
    return out


def _models(values: tuple[str, ...], family: str | None, storage_options: dict) -> tuple[dict[str, str], list[str]]:
    """(name -> URL, names of family members): --family (every model of a family.json), then --model."""
    import json

    from distmerge.storage import Location

    models: dict[str, str] = {}
    if family:
        root = Location(family, storage_options)
        manifest = json.loads(root.child("family.json").read_text())
        models.update({name: root.child(info.get("path", name)).url for name, info in manifest["models"].items()})
    members = list(models)
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or "/" in name or ":" in name:
            name, url = value.rstrip("/").rsplit("/", 1)[-1], value
        if name in models and models[name] != url:
            raise click.BadParameter(f"two models are named {name!r}; name them with NAME=URL", param_hint="--model")
        models[name] = url
    return models, members


@click.command("eval")
@click.option("--model", "model_specs", multiple=True, help="A checkpoint: NAME=URL or URL (named after its folder). "
              "Repeat. Roles by name: 'base' is the base, 'sft-<task>' the specialist of <task>.")
@click.option("--family", default=None, help="Add every model of a testbed family (folder or URL with family.json) "
              "as the base and inputs; merged models come with --model.")
@click.option("--suite", "suite_specs", multiple=True, help="'testbed', 'testbed:addition,reversal', NAME=URL or URL "
              "of a JSONL/Parquet file with prompt and answer fields (optional task, regex). Repeat.")
@click.option("--n-per-task", default=200, show_default=True, help="Prompts per testbed task.")
@click.option("--seed", default=0, show_default=True, help="Seed of the testbed prompts.")
@click.option("--regex", "regex_specs", multiple=True, help="SUITE=REGEX: extraction regex of a user suite (its first "
              "group, else the whole match, is the prediction).")
@click.option("--max-tokens", default=None, type=int, help="New-token budget for every suite (default: testbed 12, "
              "user suites 256).")
@click.option("--limit", default=None, type=int, help="Use only the first N rows of each user suite.")
@click.option("--base", "base_name", default=None, help="Name of the base model (default: the model named 'base').")
@click.option("--input", "input_names", multiple=True, help="Name of a model that was merged (an input). Repeat.")
@click.option("--specialist", "specialist_specs", multiple=True, help="TASK=NAME: the specialist of TASK "
              "(default: the model named sft-TASK). Repeat.")
@click.option("--gate", "gates", multiple=True, help="SUBJECT>=[FACTOR*]REFERENCE, e.g. 'merged>=0.9*specialist' "
              "or 'merged>=base'; a failed gate exits with status 1. Repeat.")
@click.option("--out", default=None, help="Where results.parquet, report.json, report.md and chart.png go (any URL).")
@click.option("--load-check", is_flag=True, help="First check that vLLM and transformers (float32, greedy) generate "
              "the same tokens for each model; with no --suite, only check.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt for the load check (repeat; default: a built-in few).")
@run_option_flags(EvalOptions)
@storage_options_option
def eval_cmd(model_specs, family, suite_specs, n_per_task, seed, regex_specs, max_tokens, limit, base_name, input_names,
             specialist_specs, gates, out, load_check, prompts, storage_options, **flags) -> None:
    """Evaluate checkpoints (any fsspec URL) on suites with greedy decoding on vLLM engines in Ray actors."""
    from distmerge.evaluation import check_gates, evaluate_models, parse_suite, resolve_roles, write_report
    from distmerge.evaluation.engine import EnginePool

    options = build_run_options(EvalOptions, flags)
    models, members = _models(model_specs, family, storage_options)
    if not models:
        raise click.UsageError("no models: give --model NAME=URL (repeat) or --family")
    if not suite_specs and not load_check:
        raise click.UsageError("nothing to do: give --suite (e.g. testbed) and/or --load-check")
    if suite_specs and not out:
        raise click.UsageError("--out is required with --suite (where the reports go)")
    regexes = _pairs(regex_specs, "SUITE=REGEX", "gsm8k='#### (\\S+)'")
    suites = [parse_suite(spec, n_per_task=n_per_task, seed=seed, regexes=regexes, max_tokens=max_tokens, limit=limit,
                          storage_options=storage_options) for spec in suite_specs]
    tasks = [task for suite in suites for task in suite.tasks]
    roles = resolve_roles(list(models), tasks, base=base_name, inputs=[*members, *input_names],
                          specialists=_pairs(specialist_specs, "TASK=NAME", "addition=sft-math"))
    check_gates(gates, {model: dict.fromkeys(tasks, 0.0) for model in models}, roles)  # typos fail before engines
    with EnginePool(options) as pool:
        if load_check:
            _load_checks(models, prompts, storage_options, pool)
        if not suites:
            return
        report = evaluate_models(models, suites, options, roles=roles, storage_options=storage_options, pool=pool)
    report.gate_checks = check_gates(gates, report.accuracy(), roles)
    written = write_report(report, out, storage_options)
    click.echo(_summary(report))
    click.echo(f"wrote {', '.join(written.values())}")
    if report.failed_gates:
        for check in report.failed_gates:
            click.echo(check.describe(), err=True)
        sys.exit(1)


def _load_checks(models, prompts, storage_options, pool) -> None:
    from distmerge.evaluation import LoadCheckError, load_check

    failures = []
    for name, url in models.items():
        try:
            click.echo(load_check(url, prompts or None, storage_options=storage_options, pool=pool).describe())
        except LoadCheckError as exc:
            failures.append(f"{name}: {exc}")
    if failures:
        click.echo("\n".join(failures), err=True)
        sys.exit(1)


def _summary(report) -> str:
    accuracy, tasks = report.accuracy(), report.tasks
    width = max(len(m) for m in report.models)
    lines = [f"{'model':<{width}}  " + "  ".join(f"{t:>10}" for t in tasks)]
    lines += [f"{m:<{width}}  " + "  ".join(f"{accuracy[m][t]:>10.3f}" for t in tasks) for m in report.models]
    if report.gate_checks:
        passed = sum(check.passed for check in report.gate_checks)
        lines.append(f"gates: {passed} of {len(report.gate_checks)} checks passed (details in report.md)")
    return "\n".join(lines)
