"""Aggregate measurements into a per-method table, check the targets, print it, write report.{json,md}."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from merge_bench.sampler import Measurement
from merge_bench.specs import (
    FLOOR_TARGET,
    MEMORY_TARGET_BYTES,
    METHODS,
    SPEEDUP_METHODS,
    SPEEDUP_TARGET,
)

MB = 1e6  # decimal units everywhere: MB, GB, GB/s
MEMORY_NOTE = (
    "Memory target checked against the peak PSS summed over the whole process tree (driver, Ray daemons, "
    "actors): PSS charges each shared page (torch's libraries mapped by the driver and every actor, Ray's "
    "shared-memory object store) once, split among the processes mapping it, so the sum is the memory the run "
    "occupies. Summed RSS counts such pages once per process and overstates it; it is reported alongside.")


def _aggregate(ms: list[Measurement]) -> dict | None:
    ok = [m for m in ms if m.ok]
    if not ok:
        return None if not ms else {"failed": True, "returncode": ms[-1].returncode, "tail": ms[-1].output_tail[-800:]}
    best = min(ok, key=lambda m: m.wall_s)
    worst_memory = max(ok, key=lambda m: m.peak_pss_bytes)
    return {
        "wall_s": best.wall_s, "wall_s_all": [m.wall_s for m in ok],
        "wall_s_median": statistics.median(m.wall_s for m in ok), "cpu_s": best.cpu_s, "gbps": best.gbps,
        "peak_rss_mb": max(m.peak_rss_bytes for m in ok) / MB, "peak_pss_mb": worst_memory.peak_pss_bytes / MB,
        "peak_pss_anon_mb": worst_memory.peak_pss_anon_bytes / MB, "peak_breakdown": worst_memory.peak_breakdown,
        "load": [best.load_before, best.load_after], "processes": worst_memory.processes,
        "lingering": sorted({x for m in ok for x in m.lingering}), "note": best.note,
    }


def build_report(settings: dict, methods: list[str], workers: list[int], results: list[Measurement],
                 comparisons: dict) -> dict:
    by: dict[tuple[str, str], list[Measurement]] = {}
    for m in results:
        by.setdefault((m.method, m.runner), []).append(m)
    floor = _aggregate(by.get(("-", "floor"), []))
    floor_wall = floor["wall_s"] if floor and not floor.get("failed") else None
    table = {}
    for method in methods:
        mk = _aggregate(by.get((method, "mergekit"), []))
        rows = {}
        for n in workers:
            row = _aggregate(by.get((method, f"distmerge({n}w)"), []))
            if row and not row.get("failed"):
                if mk and not mk.get("failed"):
                    row["mergekit_over_distmerge"] = mk["wall_s"] / row["wall_s"]
                if floor_wall:
                    row["over_floor"] = row["wall_s"] / floor_wall
            rows[f"distmerge({n}w)"] = row
        if mk and not mk.get("failed") and floor_wall:
            mk["over_floor"] = mk["wall_s"] / floor_wall
        rows["mergekit"] = mk
        table[method] = rows
    baselines = {runner: _aggregate(ms) for (method, runner), ms in by.items() if runner.startswith("ray-baseline")}
    return {
        **settings, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git": _git_state(settings["repo"]),
        "floor": floor, "ray_baselines": baselines, "methods": table,
        "targets": _targets(table, methods, workers), "comparisons": comparisons, "memory_note": MEMORY_NOTE,
        "method_notes": {m: METHODS[m].note for m in methods if METHODS[m].note},
        "raw": [asdict(m) | {"output_tail": m.output_tail[-600:]} for m in results],
    }


def _git_state(repo: str) -> dict:
    def git(*cmd):
        done = subprocess.run(["git", "--no-optional-locks", *cmd], cwd=repo, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "modified_files": None if status is None else len(status.splitlines())}


def _targets(table: dict, methods: list[str], workers: list[int]) -> dict:
    checks: dict[str, dict[str, bool | None]] = {
        f"{'/'.join(SPEEDUP_METHODS)} >= {SPEEDUP_TARGET:.0f}x faster than mergekit": {},
        "every method faster than mergekit": {},
        f"every method within {FLOOR_TARGET:.0f}x the floor": {},
        f"peak PSS of the whole run < {MEMORY_TARGET_BYTES / 1e9:.1f} GB (defaults)": {},
    }
    speed, faster, floor, memory = checks.values()
    for method in methods:
        for n in workers:
            key, row = f"{method} {n}w", table[method].get(f"distmerge({n}w)")
            ok = row is not None and not row.get("failed")
            ratio = row.get("mergekit_over_distmerge") if ok else None
            if method in SPEEDUP_METHODS:
                speed[key] = None if ratio is None else ratio >= SPEEDUP_TARGET
            faster[key] = None if ratio is None else ratio > 1.0
            floor[key] = None if not ok or "over_floor" not in row else row["over_floor"] <= FLOOR_TARGET
            memory[key] = row["peak_pss_mb"] * MB < MEMORY_TARGET_BYTES if ok else False
    out = {}
    for name, detail in checks.items():
        values = [v for v in detail.values() if v is not None]
        out[name] = {"verdict": "n/a" if not values else "MET" if all(values) else "MISSED", "detail": detail}
    return out


def _f(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table_lines(report: dict) -> list[str]:
    """The per-method table as Markdown rows."""
    lines = ["| method | runner | wall s | CPU s | input GB/s | peak PSS MB | peak RSS MB | mergekit / this | "
             "this / floor | load 1m before, after |", "|" + " --- |" * 10]

    def row(method: str, runner: str, r: dict | None) -> None:
        if r is None:
            return
        if r.get("failed"):
            lines.append(f"| {method} | {runner} | FAILED (rc {r['returncode']}) |" + " |" * 7)
            return
        lines.append(f"| {method} | {runner} | {r['wall_s']:.2f} | {r['cpu_s']:.1f} | {_f(r.get('gbps'), '.3f')} | "
                     f"{r['peak_pss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {_f(r.get('mergekit_over_distmerge'), '.1f', 'x')} | "
                     f"{_f(r.get('over_floor'), '.2f', 'x')} | {r['load'][0]:.1f}, {r['load'][1]:.1f} |")

    row("(floor)", "read + subtract", report["floor"])
    for runner, r in report["ray_baselines"].items():
        row("(no merge)", runner, r)
    for method, rows in report["methods"].items():
        for runner, r in rows.items():
            row(method, runner, r)
    return lines


def markdown(report: dict) -> str:
    git = report["git"]
    changes = f" + local changes in {git['modified_files']} files" if git["modified_files"] else ""
    head = [
        f"# Merge benchmark, {report['date']}", "",
        f"Family {report['size']}: {report['num_params'] / 1e6:.0f}M parameters, base + {report['inputs'] - 1} "
        f"fine-tunes in bf16, {report['input_bytes'] / 1e9:.2f} GB read per merge. Machine: {report['machine']}. "
        f"mergekit {report['mergekit'] or 'skipped'} (compute dtype {report['mergekit_dtype']}). distmerge "
        f"{report['distmerge_code']}, commit {(git['commit'] or '?')[:12]}{changes}. Walls: best of "
        f"{report['repeat']}, each run after warming the page cache; Ray start-up included.", "",
    ]
    lines = head + table_lines(report) + ["", report["memory_note"], "", "## Targets", ""]
    for name, target in report["targets"].items():
        missed = [k for k, v in target["detail"].items() if v is False]
        lines.append(f"- **{target['verdict']}** {name}" + (f" (missed: {', '.join(missed)})" if missed else ""))
    if report["comparisons"]:
        lines += ["", "## Outputs: distmerge vs mergekit", ""]
        for method, c in report["comparisons"].items():
            if "skipped" in c:
                lines.append(f"- {method}: not compared: {c['skipped']}")
            else:
                lines.append(f"- {method}: max abs diff {c['max_abs_diff']:.3e} (largest merged delta "
                             f"{c['max_abs_merged_delta']:.3e}); {c['differing_entries']} of {c['entries']} entries "
                             f"differ (equal fraction {c['equal_fraction']:.6f}), in {c['tensors_differing']} of "
                             f"{c['tensors_compared']} tensors")
    lanes = [f"- {method} {runner}: {r['note']}" for method, rows in report["methods"].items()
             for runner, r in rows.items() if runner.startswith("distmerge(") and r and r.get("note")]
    if lanes:
        lines += ["", "## Start-up lane (best run of each)", ""] + lanes
    if report["method_notes"]:
        lines += ["", "## Method notes", ""] + [f"- {m}: {note}" for m, note in report["method_notes"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "report.md").write_text(markdown(report))
