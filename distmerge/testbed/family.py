"""Build (or reuse) a testbed family: a base, task specialists, and a weak SFT + GRPO pair, with a manifest.

Layout under `out_dir`: `base/`, `sft-<task>/` per task, `sft-weak-<grpo task>/`, `grpo-<grpo task>/` (each a
Hugging Face folder: safetensors weights, config.json, generation_config.json, tokenizer files) and
`family.json`, the manifest (`FamilyManifest`).

Key decisions:
- Cached by content: family.json records a hash of the settings, the testbed code and library versions;
  a build whose hash matches and whose folders all exist returns the manifest without training. family.json
  is removed before a rebuild and written last (atomically), so it only ever describes finished folders.
- The base trains first; the specialists and the GRPO chain then run in parallel worker processes (spawn,
  one torch thread each). Every job has its own derived seed, so results do not depend on scheduling.
- A quality gate (base weak, specialists strong, GRPO above its start) is recorded per clause, and a failed
  clause is logged as a warning rather than raised: seeds vary (testbed.md), and the caller decides.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from distmerge.testbed.config import FamilySettings, code_version, family_settings, settings_hash
from distmerge.testbed.jobs import Job, init_worker, run_job

logger = logging.getLogger(__name__)

MANIFEST_NAME = "family.json"
FORMAT_VERSION = 1
NUM_WORKERS = 2  # processes for the jobs after the base; the machines this targets have 2 cores


@dataclass
class FamilyManifest:
    """What family.json holds; `root` is the folder it was read from or written to (not serialised)."""

    size: str
    seed: int
    settings_hash: str
    code_version: str
    tasks: list[str]
    grpo_task: str
    settings: dict
    models: dict[str, dict]  # name -> {name, kind, parent, task, seed, train, accuracy, train_seconds, ...}
    grpo: dict  # {task, start, model, before, after, mean_reward_per_step, delta: {changed_fraction, ...}}
    gate: dict  # {passed, clauses: [{name, passed, value, threshold}]}
    build_seconds: float
    versions: dict
    root: Path | None = None
    format_version: int = FORMAT_VERSION

    def path(self, name: str) -> Path:
        """The checkpoint folder of model `name` (e.g. "sft-addition")."""
        if name not in self.models:
            raise ValueError(f"family has no model {name!r}; it has {sorted(self.models)}")
        return Path(self.root) / self.models[name]["path"]

    def accuracy(self, name: str) -> dict[str, float]:
        return self.models[name]["accuracy"]

    def to_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "root"}

    def save(self, root: Path) -> None:
        temporary = root / f".{MANIFEST_NAME}.tmp"
        temporary.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(temporary, root / MANIFEST_NAME)
        self.root = root

    @classmethod
    def load(cls, root: str | Path) -> FamilyManifest:
        root = Path(root)
        data = json.loads((root / MANIFEST_NAME).read_text())
        return cls(**data, root=root)


def model_names(settings: FamilySettings) -> list[str]:
    """Folder names of every model the family holds."""
    task = settings.grpo.task
    return ["base", *(f"sft-{t}" for t in settings.tasks), f"sft-weak-{task}", f"grpo-{task}"]


def _cached(root: Path, settings: FamilySettings, key: str) -> FamilyManifest | None:
    if not (root / MANIFEST_NAME).exists():
        return None
    manifest = FamilyManifest.load(root)
    complete = all((root / name / "config.json").exists() and (root / name / "model.safetensors").exists()
                   for name in model_names(settings))
    if manifest.settings_hash != key or not complete:
        logger.info("family in %s is stale (hash %s, want %s; complete=%s): rebuilding",
                    root, manifest.settings_hash, key, complete)
        return None
    return manifest


def evaluate_gate(settings: FamilySettings, models: dict[str, dict], grpo: dict) -> dict:
    """Pass/fail per clause: base <= max per task, specialists >= min on their task, GRPO > its start."""
    clauses = []
    for task in settings.tasks:
        value = models["base"]["accuracy"][task]
        clauses.append({"name": f"base on {task} <= {settings.gate_base_max}", "passed": value <= settings.gate_base_max,
                        "value": value, "threshold": settings.gate_base_max})
    for task in settings.tasks:
        value = models[f"sft-{task}"]["accuracy"][task]
        clauses.append({"name": f"sft-{task} on {task} >= {settings.gate_specialist_min}",
                        "passed": value >= settings.gate_specialist_min, "value": value,
                        "threshold": settings.gate_specialist_min})
    clauses.append({"name": f"{grpo['model']} > {grpo['start']} on {grpo['task']}",
                    "passed": grpo["after"] > grpo["before"], "value": grpo["after"], "threshold": grpo["before"]})
    return {"passed": all(c["passed"] for c in clauses), "clauses": clauses}


def _run_jobs(root: Path, settings: FamilySettings, progress: bool, start: float) -> tuple[dict, dict]:
    later = [Job("sft", task, str(root), settings) for task in settings.tasks]
    later.insert(0, Job("grpo", settings.grpo.task, str(root), settings))  # the longest chain starts first
    models: dict[str, dict] = {}
    grpo: dict = {}
    context = multiprocessing.get_context("spawn")  # fork would copy the caller's torch thread pools
    pool = ProcessPoolExecutor(NUM_WORKERS, mp_context=context, initializer=init_worker)
    try:
        with tqdm(total=len(later) + 1, desc=f"testbed {settings.size}", disable=not progress) as bar:
            stages = [[Job("base", None, str(root), settings)], later]  # specialists need the base on disk
            for stage in stages:
                for future in as_completed([pool.submit(run_job, job) for job in stage]):
                    result = future.result()
                    for record in result["models"]:
                        models[record["name"]] = record
                        logger.info("[%6.1fs] %s trained in %.1fs: %s", time.perf_counter() - start,
                                    record["name"], record["train_seconds"], record["accuracy"])
                    grpo = result["grpo"] or grpo
                    bar.update()
    finally:
        # Workers that imported torch take seconds to exit; nothing is left to wait for once results are in.
        pool.shutdown(wait=False, cancel_futures=True)
    return models, grpo


def build_family(out_dir: str | Path, size: str = "small", seed: int = 0, progress: bool = True) -> FamilyManifest:
    """Build the testbed family of `size` ("tiny" or "small") from `seed` under `out_dir`, or reuse it."""
    import torch
    import transformers

    import distmerge

    settings = family_settings(size, seed)
    root = Path(out_dir)
    key = settings_hash(settings)
    cached = _cached(root, settings, key)
    if cached is not None:
        logger.info("family %s (size %s, seed %d) is up to date in %s", key, size, seed, root)
        return cached
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    start = time.perf_counter()
    logger.info("building the %s testbed family (seed %d) in %s", size, seed, root)
    models, grpo = _run_jobs(root, settings, progress, start)
    gate = evaluate_gate(settings, models, grpo)
    manifest = FamilyManifest(
        size=size, seed=seed, settings_hash=key, code_version=code_version(), tasks=list(settings.tasks),
        grpo_task=settings.grpo.task, settings=settings.to_dict(),
        models={name: models[name] for name in model_names(settings)}, grpo=grpo, gate=gate,
        build_seconds=round(time.perf_counter() - start, 2),
        versions={"distmerge": distmerge.__version__, "torch": torch.__version__,
                  "transformers": transformers.__version__},
    )
    manifest.save(root)
    logger.info("family built in %.1fs; GRPO %s: %.3f -> %.3f, %.1f%% of entries changed",
                manifest.build_seconds, grpo["task"], grpo["before"], grpo["after"],
                100 * grpo["delta"]["changed_fraction"])
    for clause in gate["clauses"]:
        if not clause["passed"]:
            logger.warning("testbed gate failed: %s (value %.3f)", clause["name"], clause["value"])
    return FamilyManifest.load(root)  # exactly what a later cache hit returns (JSON lists, not tuples)
