"""Fast exact-match evaluation of testbed models: batched decoding with a KV cache on a transformers model.

Key decisions:
- Our own decode loop instead of `model.generate`: one prefill of the left-padded prompts, then one cached
  forward per new token, with position ids taken from the attention mask so a padded prompt decodes exactly
  as it would alone. It is shared by evaluation (greedy) and GRPO (sampling at a temperature).
- Decoding stops as soon as every row has produced EOS; rows that finished keep receiving pads, which the
  answer extraction never reads.
- Scoring uses the task registry's extraction rule (text up to EOS/newline, exact match), the same rule a
  vLLM evaluator applies, so accuracies are comparable across evaluators.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from distmerge.testbed.tasks import eval_prompts, score
from distmerge.testbed.tokenizer import build_tokenizer
from distmerge.testbed.training import MAX_NEW_TOKENS, load_model


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into (input_ids, attention_mask), padding on the left."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        input_ids[i, width - len(sequence):] = torch.tensor(sequence)
        attention_mask[i, width - len(sequence):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def decode(
    model: transformers.PreTrainedModel,
    prompts: list[list[int]],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Generated token ids per prompt (EOS included when produced); greedy when temperature is 0."""
    input_ids, attention_mask = left_pad(prompts, pad_id)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = transformers.DynamicCache()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=cache, use_cache=True).logits[:, -1]
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    generated = []
    for _ in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            token = logits.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        generated.append(token)
        finished |= token == eos_id
        if bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
        position_ids = position_ids[:, -1:] + 1
        logits = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True).logits[:, -1]
    rows = torch.stack(generated, dim=1).tolist()
    # Cut each row after its EOS: what follows is padding, not output.
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]


def generate_text(model: transformers.PreTrainedModel, prompts: list[str], **kwargs) -> list[str]:
    """Completions (special tokens dropped) for text prompts; kwargs go to `decode`."""
    tokenizer = build_tokenizer()
    ids = decode(model, tokenizer(prompts)["input_ids"], eos_id=tokenizer.eos_token_id,
                 pad_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def evaluate(
    model_or_folder: transformers.PreTrainedModel | str | Path,
    tasks: list[str],
    n_per_task: int = 500,
    seed: int = 0,
    batch_size: int = 512,
) -> dict[str, float]:
    """Greedy exact-match accuracy on `n_per_task` held-out hard prompts of each task."""
    model = load_model(model_or_folder) if isinstance(model_or_folder, str | Path) else model_or_folder
    was_training = model.training
    model.eval()
    accuracy = {}
    for task in tasks:
        examples = eval_prompts(task, n_per_task, seed)
        correct = 0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            completions = generate_text(model, [e["prompt"] for e in chunk])
            correct += sum(score(c, e["answer"]) for c, e in zip(completions, chunk, strict=True))
        accuracy[task] = correct / len(examples)
    model.train(was_training)
    return accuracy
