"""One training job of a family build, run in a worker process: train, save, evaluate, report.

Key decisions:
- Jobs are independent given the base checkpoint on disk, so the specialists and the GRPO chain run in
  parallel worker processes, each with one torch thread (two threads per process on a loaded 2-core machine
  were 5-10x slower than one, testbed.md).
- A job returns small JSON-able records (accuracies, losses, seconds), never tensors; the weights go to disk.
- The GRPO chain is one job: the weak SFT is rounded to bf16 values before it is saved, and GRPO starts from
  exactly those weights, so the reasoning vector grpo − sft-weak read back from disk is the RL update alone.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

from distmerge.testbed.config import FamilySettings, derive_seed
from distmerge.testbed.evaluate import evaluate
from distmerge.testbed.grpo import delta_stats, train_grpo
from distmerge.testbed.training import (
    DataMix,
    TrainSettings,
    load_model,
    make_model,
    round_to_bf16_,
    save_checkpoint,
    train_supervised,
)


@dataclass(frozen=True)
class Job:
    """What to train: the base, one specialist (`sft`), or the weak-SFT + GRPO chain (`grpo`) of a task."""

    kind: str
    task: str | None
    out_dir: str
    settings: FamilySettings


def init_worker() -> None:
    """Process initialiser: one torch thread, no per-save progress bars from transformers."""
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _record(name: str, kind: str, parent: str | None, task: str | None, seed: int, train: dict,
            accuracy: dict[str, float], seconds: float, weights: str) -> dict:
    return {"name": name, "kind": kind, "parent": parent, "task": task, "seed": seed, "train": train,
            "accuracy": accuracy, "train_seconds": round(seconds, 2), "weights": weights, "path": name}


def _train_and_save(model, name: str, kind: str, parent: str | None, task: str | None, mix: DataMix,
                    train: TrainSettings, job: Job, bf16_rounded: bool = False) -> dict:
    seed = derive_seed(job.settings.seed, name)
    stats = train_supervised(model, mix, train, seed)
    if bf16_rounded:
        round_to_bf16_(model)
    save_checkpoint(model, Path(job.out_dir) / name)
    accuracy = evaluate(model, list(job.settings.tasks), job.settings.eval_n_per_task, job.settings.eval_seed)
    details = {**asdict(train), "data": asdict(mix), "first_loss": stats["first_loss"],
               "final_loss": stats["final_loss"]}
    return _record(name, kind, parent, task, seed, details, accuracy, stats["seconds"],
                   "bf16-rounded float32" if bf16_rounded else "float32")


def run_job(job: Job) -> dict:
    """Run `job`; returns {"models": [records], "grpo": stats or None}."""
    settings = job.settings
    base_mix = DataMix(tasks=settings.tasks, hard_fraction=settings.base_hard_fraction)
    if job.kind == "base":
        model = make_model(settings.shape, derive_seed(settings.seed, "base/init"))
        return {"models": [_train_and_save(model, "base", "base", None, None, base_mix, settings.base, job)],
                "grpo": None}
    base = load_model(Path(job.out_dir) / "base")
    focus_mix = DataMix(tasks=settings.tasks, hard_fraction=settings.base_hard_fraction, focus=job.task,
                        focus_hard_fraction=settings.sft_hard_fraction, replay=settings.replay)
    if job.kind == "sft":
        record = _train_and_save(base, f"sft-{job.task}", "sft", "base", job.task, focus_mix, settings.sft, job)
        return {"models": [record], "grpo": None}
    if job.kind == "grpo":
        return _run_grpo_chain(base, focus_mix, job)
    raise AssertionError(f"unknown job kind {job.kind}")


def _run_grpo_chain(base, focus_mix: DataMix, job: Job) -> dict:
    settings, task = job.settings, job.task
    weak_name, grpo_name = f"sft-weak-{task}", f"grpo-{task}"
    weak = _train_and_save(base, weak_name, "sft-weak", "base", task, focus_mix, settings.weak_sft, job,
                           bf16_rounded=True)
    start = copy.deepcopy(base)  # `base` now holds the weak SFT's weights
    grpo_settings = settings.grpo
    seed = derive_seed(settings.seed, grpo_name)
    stats = train_grpo(base, grpo_settings, seed)
    save_checkpoint(base, Path(job.out_dir) / grpo_name)
    accuracy = evaluate(base, list(settings.tasks), settings.eval_n_per_task, settings.eval_seed)
    record = _record(grpo_name, "grpo", weak_name, task, seed, asdict(grpo_settings), accuracy,
                     stats["seconds"], "bf16-rounded float32")
    grpo = {"task": task, "start": weak_name, "model": grpo_name, "before": weak["accuracy"][task],
            "after": accuracy[task], "mean_reward_per_step": [round(r, 4) for r in stats["mean_reward_per_step"]],
            "delta": delta_stats(base, start)}
    return {"models": [weak, record], "grpo": grpo}
