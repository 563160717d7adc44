"""GRPO for the testbed: grouped sampling, exact-match reward, group-normalised advantages, on-policy updates.

Key decisions (testbed.md "What worked"):
- Start from a weakly trained SFT (a strong one leaves no reward variance to learn from), sample
  `num_samples` completions per prompt at temperature 1, reward exact match, and normalise rewards within
  each prompt's group. Groups where every sample scores the same carry no signal and get advantage 0.
- One on-policy update per batch: the importance ratio is exactly 1, so the clipped PPO surrogate reduces to
  the plain policy gradient, and no reference model or KL term is needed. Token-level mean over the batch.
- bf16 weights: real RL vectors look sparse mostly because updates fall below bf16 resolution. With
  `bf16_weights=True` (default) the weights are rounded to bf16 after every update (compute and Adam state
  stay float32), so an update smaller than half a bf16 step is lost exactly as in bf16 training; with False,
  float32 master weights are only rounded at the end. Either way the result is bf16-representable, and the
  starting point is rounded too, so GRPO − start contains nothing but the RL updates.
- No weight decay: it would move every entry and hide the sparsity that is being measured.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
import transformers

from distmerge.testbed.evaluate import decode
from distmerge.testbed.tasks import sample_train, score
from distmerge.testbed.tokenizer import build_tokenizer
from distmerge.testbed.training import round_to_bf16_


@dataclass(frozen=True)
class GRPOSettings:
    """One GRPO run on one task."""

    task: str = "reversal"
    steps: int = 50
    lr: float = 3e-5
    num_prompts: int = 32
    num_samples: int = 8  # completions per prompt (the group)
    temperature: float = 1.0
    hard_fraction: float = 0.5  # share of hard prompts in the RL batches, the rest easy
    bf16_weights: bool = True
    grad_clip: float = 1.0


def group_advantages(rewards: torch.Tensor, num_samples: int) -> torch.Tensor:
    """(r - group mean) / group std per prompt; 0 where a group's rewards are all equal."""
    groups = rewards.view(-1, num_samples)
    std = groups.std(dim=1, unbiased=False, keepdim=True)
    advantages = (groups - groups.mean(dim=1, keepdim=True)) / std.clamp(min=1e-6)
    return torch.where(std > 0, advantages, torch.zeros_like(advantages)).view(-1)


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each completion token under `model`, and the mask of real completion tokens."""
    rows = [p + c for p, c in zip(prompts, completions, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, len(prompt): len(row)] = True
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logprobs, completion_mask[:, 1:]


def train_grpo(model: transformers.PreTrainedModel, settings: GRPOSettings, seed: int) -> dict:
    """Run GRPO on `model` in place; returns the mean reward per step and the seconds it took."""
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    rng = random.Random(f"grpo/{seed}")
    generator = torch.Generator().manual_seed(seed)
    round_to_bf16_(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rewards_per_step = []
    for _ in range(settings.steps):
        examples = [sample_train(settings.task, "hard" if rng.random() < settings.hard_fraction else "easy", rng)
                    for _ in range(settings.num_prompts)]
        examples = [e for e in examples for _ in range(settings.num_samples)]  # groups are contiguous
        prompts = tokenizer([e["prompt"] for e in examples])["input_ids"]
        model.eval()
        completions = decode(model, prompts, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                             temperature=settings.temperature, generator=generator)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        rewards = torch.tensor([float(score(t, e["answer"])) for t, e in zip(texts, examples, strict=True)])
        rewards_per_step.append(rewards.mean().item())
        advantages = group_advantages(rewards, settings.num_samples)
        model.train()
        logprobs, mask = completion_logprobs(model, prompts, completions, tokenizer.pad_token_id)
        loss = -(advantages[:, None] * logprobs * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        if settings.bf16_weights:
            round_to_bf16_(model)
    round_to_bf16_(model)
    model.eval()
    return {"mean_reward_per_step": rewards_per_step, "seconds": time.perf_counter() - start}


@torch.no_grad()
def delta_stats(finetuned: torch.nn.Module, start: torch.nn.Module, threshold: float = 1e-5) -> dict[str, float]:
    """How sparse the vector finetuned − start is: share of entries with |delta| > threshold, and its L2 norm."""
    changed = total = 0
    squared = 0.0
    start_params = dict(start.named_parameters())
    for name, param in finetuned.named_parameters():
        delta = param.float() - start_params[name].float()
        changed += int((delta.abs() > threshold).sum())
        total += delta.numel()
        squared += float(delta.pow(2).sum())
    return {"changed_fraction": changed / total, "threshold": threshold, "l2": squared ** 0.5,
            "num_entries": total}
