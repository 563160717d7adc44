"""Model construction, supervised training and checkpoint writing for the testbed family.

Key decisions:
- Qwen2 architecture with untied embeddings and grouped-query attention: the shape of real checkpoints that
  distmerge merges, small enough to train on one CPU core. Head size stays at 32 because vLLM needs >= 32.
- Loss only on answer tokens (and the EOS that ends them): prompts are random strings, so predicting them
  would only add noise to the gradient and to the task vectors.
- Data are mixtures (`DataMix`): the base sees every task, mostly easy; a specialist sees its task at both
  levels plus a replayed share of the base mixture, which keeps its task vector small enough to merge.
- One explicit seed per job drives the weight init (torch) and the data (`random.Random`); with one torch
  thread per process the result is bit-for-bit reproducible.
- Checkpoints are written to a staging folder and renamed into place, so a crashed build never leaves a
  half-written folder under a final name.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from distmerge.testbed.tasks import Example, sample_train
from distmerge.testbed.tokenizer import build_tokenizer, save_tokenizer, vocabulary

MAX_NEW_TOKENS = 12  # longest answer: 8 sorted digits / letters, or a 4-digit sum; leaves slack for EOS


@dataclass(frozen=True)
class ModelShape:
    """Architecture of every model in a family (they must share it to be merged)."""

    hidden_size: int = 192
    num_layers: int = 3
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 64


@dataclass(frozen=True)
class DataMix:
    """Where training instances come from: the base mixture, optionally focused on one task."""

    tasks: tuple[str, ...]
    hard_fraction: float = 0.1  # base mixture: share of hard instances per task
    focus: str | None = None  # the specialist's task, or None for the base mixture alone
    focus_hard_fraction: float = 0.5
    replay: float = 0.25  # share of a specialist's instances replayed from the base mixture

    def sample(self, rng: random.Random) -> Example:
        if self.focus is not None and rng.random() >= self.replay:
            level = "hard" if rng.random() < self.focus_hard_fraction else "easy"
            return sample_train(self.focus, level, rng)
        level = "hard" if rng.random() < self.hard_fraction else "easy"
        return sample_train(rng.choice(self.tasks), level, rng)


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser and schedule of one supervised run (AdamW, linear warmup then cosine decay)."""

    steps: int
    lr: float
    batch_size: int = 64
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1  # cosine decays to this share of the peak rate
    weight_decay: float = 0.0
    grad_clip: float = 1.0


def make_model(shape: ModelShape, seed: int) -> transformers.Qwen2ForCausalLM:
    """A freshly initialised float32 Qwen2 model over the testbed vocabulary."""
    vocab = vocabulary()
    config = transformers.Qwen2Config(
        vocab_size=len(vocab), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False, bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"],
        pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"],
        do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
    )
    return model


def encode_examples(tokenizer, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 except on answer tokens + EOS."""
    prompts = tokenizer([e["prompt"] for e in examples])["input_ids"]
    answers = tokenizer([e["answer"] for e in examples], add_special_tokens=False)["input_ids"]
    rows = [(p, a + [tokenizer.eos_token_id]) for p, a in zip(prompts, answers, strict=True)]
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        length = len(prompt) + len(answer)
        input_ids[i, :length] = torch.tensor(prompt + answer)
        labels[i, len(prompt):length] = torch.tensor(answer)
        attention_mask[i, :length] = 1
    return input_ids, attention_mask, labels


def answer_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) positions."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def cosine_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, round(settings.warmup_fraction * settings.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, settings.steps - warmup)
        return settings.min_lr_fraction + (1 - settings.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_supervised(model, mix: DataMix, settings: TrainSettings, seed: int) -> dict[str, float]:
    """Train `model` in place on `mix`; returns the first/last losses and the seconds it took."""
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    rng = random.Random(f"train/{seed}")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95),
                                  weight_decay=settings.weight_decay)
    scheduler = cosine_schedule(optimizer, settings)
    model.train()
    losses = []
    for _ in range(settings.steps):
        batch = encode_examples(tokenizer, [mix.sample(rng) for _ in range(settings.batch_size)])
        loss = answer_loss(model, *batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-10:]
    return {"first_loss": losses[0], "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - start}


@torch.no_grad()
def round_to_bf16_(model) -> None:
    """Round every parameter to the nearest bfloat16 value, keeping float32 storage."""
    for param in model.parameters():
        param.copy_(param.to(torch.bfloat16).to(param.dtype))


def save_checkpoint(model, folder: Path) -> None:
    """Write model (safetensors, float32), configs and tokenizer to `folder` via a staging folder."""
    staging = folder.with_name(f".staging-{folder.name}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    save_tokenizer(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def load_model(folder: str | Path) -> transformers.PreTrainedModel:
    """Load a family checkpoint in float32, in eval mode."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval()
