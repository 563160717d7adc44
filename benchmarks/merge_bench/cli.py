"""Command line and orchestration: family, then per method distmerge (each worker count) and mergekit, with
the floor measured before and after the merges (best of both: the machine is shared and noisy).

Every run starts from a warm page cache. distmerge runs from a snapshot of distmerge/ taken at start (the
work tree is shared and may change during a long run); merged outputs go to the cache folder and are deleted
after each method unless --keep-outputs. The report goes to runs/bench/<timestamp>/report.{json,md}, the
logs of every run next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from merge_bench import mergekit as mk
from merge_bench.family import SIZES, build_family, warm_page_cache
from merge_bench.log import log
from merge_bench.report import build_report, markdown, write_report
from merge_bench.runners import (
    REPO,
    child_env,
    distmerge_command,
    floor_command,
    ray_baseline_command,
    snapshot_code,
)
from merge_bench.sampler import Measurement, measure
from merge_bench.specs import DEFAULT_METHODS, METHODS


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Merge benchmark: distmerge vs mergekit vs the floor.")
    parser.add_argument("--size", default="0.5b", choices=sorted(SIZES), help="family size (default 0.5b; "
                        "50m for quick iteration)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated (default {','.join(DEFAULT_METHODS)}; also "
                             f"{','.join(m for m in METHODS if m not in DEFAULT_METHODS)})")
    parser.add_argument("--workers", default="1,2", help="distmerge worker counts (0: no Ray), default 1,2")
    parser.add_argument("--skip-mergekit", action="store_true", help="run distmerge and the floor only")
    parser.add_argument("--compare-outputs", action="store_true",
                        help="per method with the same semantics: max abs diff and equal fraction vs mergekit")
    parser.add_argument("--no-ray-baseline", action="store_true", help="skip the Ray start-up baseline rows")
    parser.add_argument("--repeat", type=int, default=1, help="repeats; walls are best-of, memory worst-of")
    parser.add_argument("--distmerge-args", default="", help="extra `distmerge merge` flags, e.g. '--block-size "
                        "64MiB' (default: none, distmerge's defaults are what the targets are about)")
    parser.add_argument("--mergekit-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="mergekit compute dtype (float32 = distmerge's semantics; default)")
    parser.add_argument("--mergekit-shard-mib", type=int, default=256, help="mergekit output shard size")
    parser.add_argument("--mergekit-spec", default=mk.MERGEKIT_SPEC, help=f"pip spec (default {mk.MERGEKIT_SPEC})")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed")
    parser.add_argument("--keep-outputs", action="store_true", help="keep merged checkpoints in the cache folder")
    parser.add_argument("--live-tree", action="store_true", help="run the work tree's distmerge, not a snapshot")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "bench"), help="family, mergekit venv, outputs")
    parser.add_argument("--out", default=None, help="report folder (default runs/bench/<timestamp>)")
    args = parser.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    args.worker_list = [int(w) for w in args.workers.split(",") if w.strip()]
    return args


def startup_lane_note(out: Path) -> str:
    """How much of the work the driver did (the rest was the actors'), whether it started Ray and how many
    actors, from the provenance."""
    run = json.loads((out / "distmerge_provenance.json").read_text())["run"]
    ray = {True: ", Ray started", False: ", Ray not started"}.get(run.get("ray_started"), "")
    actors = f", {run['actors_started']} actor(s) started" if "actors_started" in run else ""
    return (f"{run.get('block_tasks_in_driver', 0)} of {run.get('block_tasks', '?')} block tasks "
            f"(a block in one pass) run by the driver{ray}{actors}")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown CPU")
    memory = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return f"{len(os.sched_getaffinity(0))} CPUs ({model}), {memory / 2**20:.0f} GiB RAM"


def run_benchmark(args: argparse.Namespace) -> dict:
    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out or REPO / "runs" / "bench" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    family = build_family(cache, args.size)
    exe = None if args.skip_mergekit else mk.ensure_mergekit(cache, args.mergekit_spec)
    scratch = cache / f"run-{args.size}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    env, cwd, code = child_env(cache), REPO, "live work tree"
    if not args.live_tree:
        snapshot, digest = snapshot_code(scratch)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(snapshot), env.get("PYTHONPATH")) if p)
        cwd, code = scratch, f"snapshot {digest}"  # not the repository root: nothing imports the live tree
        log(f"measuring a snapshot of distmerge/ ({digest})")
    # Untimed: build the measured code's CPU kernels (installing does this once for the work tree).
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from distmerge.methods import cpu_kernels; cpu_kernels.warm_up()"],
                   env=env, cwd=cwd, check=True)
    log(f"CPU kernels ready in {time.perf_counter() - start:.1f}s")
    results: list[Measurement] = []
    comparisons: dict[str, dict] = {}

    def run(runner: str, method: str, cmd: list[str], log_name: str) -> Measurement:
        warm_page_cache(family)
        m = measure(runner, method, cmd, env, family.input_bytes, args.timeout, cwd, out_dir / "logs" / log_name)
        log(f"{method:16s} {runner:18s} {m.wall_s:8.2f}s  cpu {m.cpu_s:7.1f}s  PSS {m.peak_pss_bytes / 1e6:6.0f} MB"
            f"  RSS {m.peak_rss_bytes / 1e6:6.0f} MB  load {m.load_before:.1f}->{m.load_after:.1f}"
            f"  {'ok' if m.ok else f'FAILED rc={m.returncode}'}")
        if not m.ok:
            print(m.output_tail, file=sys.stderr)
        results.append(m)
        return m

    for repeat in range(args.repeat):
        run("floor", "-", floor_command(sys.executable, family), f"floor-{repeat}a.log")
        for n in [] if args.no_ray_baseline else [w for w in args.worker_list if w > 0]:
            m = run(f"ray-baseline({n}w)", "-", ray_baseline_command(sys.executable, n), f"ray-{n}w-{repeat}.log")
            m.note = "; ".join(line for line in m.output_tail.splitlines() if "distmerge: " in line)
        for method in args.method_list:
            spec, outputs = METHODS[method], []
            for n in args.worker_list:
                out = scratch / "out" / f"distmerge-{method}-{n}w"
                cmd = distmerge_command(spec, family, n, out, scratch / "recipes" / f"{method}.yaml",
                                        args.distmerge_args.split())
                m = run(f"distmerge({n}w)", method, cmd, f"distmerge-{method}-{n}w-{repeat}.log")
                if m.ok:
                    outputs.append(out)
                    m.note = startup_lane_note(out) if n else ""
            if exe is not None and spec.mk_method is not None:
                out = scratch / "out" / f"mergekit-{method}"
                cmd = mk.mergekit_command(exe, spec, family, out, scratch / "mergekit" / f"{method}.yaml",
                                          args.mergekit_dtype, args.mergekit_shard_mib)
                m = run("mergekit", method, cmd, f"mergekit-{method}-{repeat}.log")
                m.note = f"mergekit {spec.mk_method}"
                if args.compare_outputs and repeat == 0 and m.ok and outputs:
                    comparisons[method] = (mk.compare_outputs(outputs[0], out, family.dirs["base"]) if spec.comparable
                                           else {"skipped": spec.note or "semantics differ"})
            if not args.keep_outputs:
                shutil.rmtree(scratch / "out", ignore_errors=True)
        run("floor", "-", floor_command(sys.executable, family), f"floor-{repeat}b.log")

    settings = {"repo": str(REPO), "size": args.size, "num_params": family.num_params, "inputs": 1 + len(family.models),
                "input_bytes": family.input_bytes, "family": str(family.root), "workers": args.worker_list,
                "repeat": args.repeat, "distmerge_args": args.distmerge_args, "distmerge_code": code,
                "mergekit": mk.mergekit_version(exe) if exe else None, "mergekit_dtype": args.mergekit_dtype,
                "machine": machine()}
    report = build_report(settings, args.method_list, args.worker_list, results, comparisons)
    write_report(report, out_dir)
    print("\n" + markdown(report))
    log(f"wrote {out_dir / 'report.md'} and report.json")
    return report


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: measure() ends the running child's tree
    run_benchmark(parse_args(sys.argv[1:] if argv is None else argv))
