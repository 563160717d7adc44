"""The result of an evaluation (`EvalReport`) and the files it is published as.

Files under the output URL (any fsspec URL, written through `Location`):
- `results.parquet`: one row per model x task x example (prompt, answer, completion, prediction, correct).
- `report.json`: models, suites, roles, per model x task aggregates (accuracy, standard error), gate checks,
  run facts (device, dtype, actors, seconds, prompts/s).
- `report.md`: a model x task accuracy table, a comparison of each merged model with the base and each input
  (difference to the base, share of the specialist's score on its own task), the gate checks, the suites.
- `chart.png`: grouped bars, one group per task, one bar per model.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distmerge.evaluation.gates import GateCheck, Roles
from distmerge.storage import Location

RESULT_COLUMNS = ("model", "suite", "task", "example", "prompt", "answer", "completion", "prediction", "correct",
                  "num_tokens")


@dataclass
class EvalReport:
    """Per-example results of several models on several suites, with the roles that compare them."""

    models: dict[str, str]  # name -> URL
    suites: list[dict[str, Any]]  # {name, source, tasks, max_tokens, num_examples}
    rows: list[dict[str, Any]]  # RESULT_COLUMNS
    roles: Roles
    meta: dict[str, Any] = field(default_factory=dict)
    gate_checks: list[GateCheck] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return [task for suite in self.suites for task in suite["tasks"]]

    def aggregates(self) -> list[dict[str, Any]]:
        """One record per model x task: examples, correct ones, accuracy and its standard error."""
        counts: dict[tuple[str, str], list] = {}
        for row in self.rows:
            entry = counts.setdefault((row["model"], row["task"]), [row["suite"], 0, 0, 0])
            entry[1] += 1
            entry[2] += bool(row["correct"])
            entry[3] += row["num_tokens"]
        out = []
        for model in self.models:
            for task in self.tasks:
                suite, total, correct, tokens = counts[(model, task)]
                accuracy = correct / total
                out.append({"model": model, "suite": suite, "task": task, "num_examples": total,
                            "num_correct": correct, "accuracy": accuracy,
                            "stderr": math.sqrt(accuracy * (1 - accuracy) / total),
                            "mean_tokens": tokens / total})
        return out

    def accuracy(self) -> dict[str, dict[str, float]]:
        """accuracy[model][task]."""
        table: dict[str, dict[str, float]] = {model: {} for model in self.models}
        for record in self.aggregates():
            table[record["model"]][record["task"]] = record["accuracy"]
        return table

    @property
    def failed_gates(self) -> list[GateCheck]:
        return [check for check in self.gate_checks if not check.passed]

    def to_json(self) -> dict[str, Any]:
        return {"models": self.models, "suites": self.suites, "roles": self.roles.to_json(),
                "accuracy": self.accuracy(), "aggregates": self.aggregates(),
                "gates": [check.__dict__ | {"text": check.describe()} for check in self.gate_checks],
                "gates_passed": not self.failed_gates, "meta": self.meta}


def write_report(report: EvalReport, out: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write results.parquet, report.json, report.md and chart.png under `out`; returns name -> URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Location(out, storage_options)
    table = pa.Table.from_pylist([{key: row[key] for key in RESULT_COLUMNS} for row in report.rows])
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    files = {"results.parquet": buffer.getvalue().to_pybytes(),
             "report.json": (json.dumps(report.to_json(), indent=2) + "\n").encode(),
             "chart.png": render_chart(report),
             "report.md": render_markdown(report).encode()}
    for name, data in files.items():
        root.child(name).write_bytes(data)
    return {name: root.child(name).url for name in files}


def _role(report: EvalReport, model: str) -> str:
    roles = report.roles
    if model == roles.base:
        return "base"
    tasks = [task for task, name in roles.specialists.items() if name == model]
    if tasks:
        return f"specialist ({', '.join(tasks)})"
    return "input" if model in roles.inputs else "merged"


def render_markdown(report: EvalReport) -> str:
    accuracy, tasks = report.accuracy(), report.tasks
    meta = report.meta
    lines = ["# Evaluation report", "",
             f"{len(report.models)} models x {len(tasks)} tasks, greedy decoding, {meta.get('device', '?')} "
             f"engines ({meta.get('dtype', '?')}, {meta.get('num_actors', '?')} actors), "
             f"{meta.get('seconds', 0):.1f} s, {meta.get('prompts_per_second', 0):.1f} prompts/s.", "",
             "## Accuracy", "", "| model | role | " + " | ".join(tasks) + " | mean |",
             "|---|---|" + "---:|" * (len(tasks) + 1)]
    for model in report.models:
        scores = [accuracy[model][task] for task in tasks]
        lines.append(f"| {model} | {_role(report, model)} | " + " | ".join(f"{s:.3f}" for s in scores)
                     + f" | {sum(scores) / len(scores):.3f} |")
    lines += _comparison(report, accuracy, tasks)
    if report.gate_checks:
        lines += ["", "## Gates", ""] + [f"- {'PASS' if c.passed else 'FAIL'}: {c.describe()}"
                                         for c in report.gate_checks]
    lines += ["", "## Suites", ""] + [f"- {s['name']}: {s['num_examples']} examples, tasks {', '.join(s['tasks'])}, "
                                      f"at most {s['max_tokens']} new tokens; {s['source']}" for s in report.suites]
    lines += ["", "![accuracy per task](chart.png)", ""]
    return "\n".join(lines)


def _comparison(report: EvalReport, accuracy: dict, tasks: list[str]) -> list[str]:
    roles = report.roles
    references = ([roles.base] if roles.base else []) + roles.inputs
    candidates = roles.candidates(report.models)
    if not references or not candidates:
        return []
    lines = ["", "## Merged vs base vs inputs"]
    for model in candidates:
        header = [model] + [f"{ref} (Δ)" for ref in references]
        if roles.specialists:
            header.append("share of specialist")
        lines += ["", f"### {model}", "", "| task | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
        for task in tasks:
            score = accuracy[model][task]
            cells = [f"{score:.3f}"] + [f"{accuracy[ref][task]:.3f} ({score - accuracy[ref][task]:+.3f})"
                                        for ref in references]
            if roles.specialists:
                specialist = roles.specialists.get(task)
                own = accuracy[specialist][task] if specialist else None
                cells.append(f"{score / own:.0%} of {specialist}" if own else "-")
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def render_chart(report: EvalReport) -> bytes:
    """PNG bytes of a grouped bar chart: tasks on the x axis, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    accuracy, models = report.accuracy(), list(report.models)
    groups = [*report.tasks, "mean"]
    for scores in accuracy.values():
        scores["mean"] = sum(scores.values()) / len(scores)
    width = 0.8 / len(models)
    figure, axes = plt.subplots(figsize=(4 + 0.3 * len(groups) * len(models), 4), dpi=100)
    for i, model in enumerate(models):
        positions = [g + (i - (len(models) - 1) / 2) * width for g in range(len(groups))]
        axes.bar(positions, [accuracy[model][group] for group in groups], width,
                 label=f"{model} ({_role(report, model).split(' ')[0]})")
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("accuracy (exact match)")
    axes.set_title("Greedy accuracy per task")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
