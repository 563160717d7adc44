"""Load check: a checkpoint means the same thing to vLLM as to transformers.

vLLM has its own weight loader (it fuses q/k/v and gate/up, pads vocabularies, skips tied heads), so a
checkpoint with wrong tensor names, shapes or layouts can load in one library and not the other, or load in
both and compute different things. The check runs both in float32 with greedy decoding on a few prompts and
requires the same generated token ids (float32 greedy matches token for token on CPU; bf16 breaks ties
differently). Both run in an engine actor, so they see the same local copy of a remote checkpoint.

transformers loads with `output_loading_info`: missing, unexpected or mis-shaped tensors are reported by name
instead of being silently re-initialised. `reference` optionally points transformers at another checkpoint
(e.g. the original, when checking that a conversion or an identity merge kept the model intact).
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distmerge.errors import DistmergeError
from distmerge.evaluation.engine import EnginePool
from distmerge.evaluation.options import EvalOptions
from distmerge.storage import Location

DEFAULT_PROMPTS = ("add:23+58=", "rev:merging=", "sort:8351=", "The capital of France is", "def fibonacci(n):")
DEFAULT_MAX_TOKENS = 16


class LoadCheckError(DistmergeError, ValueError):
    """vLLM and transformers disagree about a checkpoint, or one of them cannot load it."""


@dataclass
class LoadCheckResult:
    url: str
    reference: str
    prompts: list[str]
    vllm_ids: list[list[int]]
    transformers_ids: list[list[int]]
    vllm_texts: list[str]
    transformers_texts: list[str]

    @property
    def mismatches(self) -> list[int]:
        return [i for i, (a, b) in enumerate(zip(self.vllm_ids, self.transformers_ids, strict=True)) if a != b]

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def describe(self) -> str:
        if self.passed:
            return f"load check passed for {self.url}: vLLM and transformers agree on {len(self.prompts)} prompts"
        lines = [f"load check FAILED for {self.url}: vLLM and transformers (float32, greedy) disagree on "
                 f"{len(self.mismatches)} of {len(self.prompts)} prompts. Wrong tensor names or layouts are the "
                 "usual cause. Fix: compare the checkpoint's tensor names and shapes with its config"]
        for i in self.mismatches:
            ours, theirs = self.vllm_ids[i], self.transformers_ids[i]
            first = next((k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                         min(len(ours), len(theirs)))
            lines += [f"  prompt {self.prompts[i]!r} (first difference at generated token {first}):",
                      f"    vLLM:         {self.vllm_texts[i]!r}", f"    transformers: {self.transformers_texts[i]!r}"]
        return "\n".join(lines)


def tokenize(path: str, prompts: Sequence[str]) -> list[list[int]]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return [tokenizer(prompt)["input_ids"] for prompt in prompts]


def detokenize(path: str, sequences: list[list[int]]) -> list[str]:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return [tokenizer.decode(ids, skip_special_tokens=False) for ids in sequences]


def transformers_greedy(path: str, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy new token ids per prompt from transformers `generate` in float32, one prompt at a time (no padding)."""
    import torch
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True, ignore_mismatched_sizes=True)
    shapes = [f"{name} is {list(stored)} in the file but {list(expected)} in the model"
              for name, stored, expected in info.get("mismatched_keys") or []]
    problems = [f"{kind.replace('_', ' ')}: {', '.join(sorted(info[kind]))}" for kind in ("missing_keys", "unexpected_keys")
                if info.get(kind)] + shapes
    if problems:
        raise LoadCheckError(f"transformers loads {path} only partially ({'; '.join(problems)}). Fix: the tensor "
                             "names and shapes must match the architecture in config.json")
    config = model.generation_config
    greedy = transformers.GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=config.eos_token_id,
                                           pad_token_id=config.pad_token_id if config.pad_token_id is not None
                                           else config.eos_token_id)
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            input_ids = torch.tensor([ids])
            generated = model.eval().generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                              generation_config=greedy)
            out.append(generated[0, len(ids):].tolist())
    del model
    gc.collect()
    return out


def _get(ref, side: str, url: str):
    import ray

    try:
        return ray.get(ref), None
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None) or exc
        text = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        return None, f"{side} cannot load {url}: {type(cause).__name__}: {text[:800]}"


def load_check(url: str, prompts: Sequence[str] | None = None, *, reference: str | None = None,
               max_tokens: int = DEFAULT_MAX_TOKENS, options: EvalOptions | None = None,
               storage_options: Mapping[str, Any] | None = None, pool: EnginePool | None = None,
               raise_on_mismatch: bool = True) -> LoadCheckResult:
    """Compare vLLM's and transformers' float32 greedy output on `prompts` for the checkpoint at `url`.

    Raises LoadCheckError naming both outputs per differing prompt (unless `raise_on_mismatch` is False),
    or naming what failed when either library cannot load the checkpoint.
    """
    import ray

    prompts = list(prompts or DEFAULT_PROMPTS)
    checkpoint = Location(url, storage_options)
    reference_checkpoint = Location(reference, storage_options) if reference else checkpoint
    owned = pool is None
    pool = pool or EnginePool((options or EvalOptions()).model_copy(update={"num_actors": 1}), dtype="float32")
    try:
        actor = pool.actors[0]
        ids = ray.get(actor.with_checkpoint.remote(tokenize, reference_checkpoint, prompts))
        # transformers first: its model is freed before the vLLM engine allocates.
        hf_ids, hf_error = _get(actor.with_checkpoint.remote(transformers_greedy, reference_checkpoint, ids, max_tokens),
                                "transformers", reference_checkpoint.url)
        vllm_ids, vllm_error = _get(actor.greedy_token_ids.remote(checkpoint, ids, max_tokens, "float32"), "vLLM", url)
        if hf_error or vllm_error:
            raise LoadCheckError(f"load check FAILED for {url}: " + "; ".join(filter(None, [hf_error, vllm_error])))
        texts = ray.get([actor.with_checkpoint.remote(detokenize, reference_checkpoint, seqs)
                         for seqs in (vllm_ids, hf_ids)])
    finally:
        if owned:
            pool.close()
    result = LoadCheckResult(url, reference_checkpoint.url, prompts, vllm_ids, hf_ids, *texts)
    if raise_on_mismatch and not result.passed:
        raise LoadCheckError(result.describe())
    return result
