#!/usr/bin/env python
"""Merge benchmark: distmerge (1 and 2 Ray workers) vs mergekit vs a read-and-subtract floor.

    .venv/bin/python benchmarks/merge_benchmark.py --size 50m --skip-mergekit    # quick iteration
    .venv/bin/python benchmarks/merge_benchmark.py --compare-outputs             # 0.5B, all 7 methods

Builds (once, cached under .cache/bench/) a synthetic Qwen2-shaped family: a base and three fine-tunes in
bf16 (two dense SFT-like, one sparse RL-like). Per method it runs `distmerge merge --workers N` for each N,
mergekit (installed by the script in its own venv) and the floor (load every input tensor, subtract), and
reports wall seconds, CPU seconds, input GB/s, peak PSS and RSS of the whole process tree, the ratios to
mergekit and to the floor, and which targets are met: runs/bench/<timestamp>/report.{json,md}. The code is
in benchmarks/merge_bench/.
"""

from __future__ import annotations

import sys

from merge_bench.cli import main
from merge_bench.runners import floor_worker, ray_baseline_worker

if __name__ == "__main__":
    if sys.argv[1:2] == ["floor-worker"]:
        floor_worker(sys.argv[2:])
    elif sys.argv[1:2] == ["ray-baseline-worker"]:
        ray_baseline_worker(int(sys.argv[2]))
    else:
        main()
