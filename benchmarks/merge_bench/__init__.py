"""Merge benchmark: distmerge (Ray workers) vs mergekit vs a read-and-subtract floor on a synthetic Qwen2 family.

Modules, in the order a run uses them: `family` (build and cache the synthetic checkpoints), `specs` (the
methods and how each tool is configured for them), `sampler` (run a command, sample its process tree),
`runners` (distmerge, floor, Ray baseline), `mergekit` (its own venv, configs, output comparison), `report`
(aggregate, check the targets, write runs/bench/<timestamp>/report.{json,md}), `cli` (the orchestration).
The entry point is benchmarks/merge_benchmark.py.
"""
