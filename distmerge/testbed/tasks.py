"""Synthetic tasks for the testbed family: prompt/answer generators, difficulty levels, exact-match scoring.

Every task maps a short body to an answer, written as a prompt `<prefix>:<body>=` and an answer string
(`add:23+58=` -> `81`). Key decisions:
- Two difficulty levels. The base sees mostly `easy` instances; everything is evaluated on `hard` ones,
  where the base is weak and a specialist is strong, so merges have room to move (see testbed.md).
- Held-out by construction: a prompt belongs to the evaluation split iff a stable hash of it falls in one
  bucket of ten. Training samplers reject those prompts and `eval_prompts` only returns them, so no
  evaluation prompt is ever trained on, whatever the seeds.
- Deterministic: every sampler takes an explicit seed or `random.Random`; there is no global RNG.
- The answer extraction rule is the same everywhere (this evaluator, GRPO rewards, a vLLM evaluator):
  the generated text up to the first EOS or newline, stripped of surrounding spaces, compared exactly.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

LEVELS = ("easy", "hard")
EOS_TOKEN = "<eos>"
_HELD_OUT_BUCKETS = 10


class Example(TypedDict):
    """One instance: the prompt fed to the model and the exact answer it must generate."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """A named task: `make(rng, level)` returns (body, answer); the prompt is `{prefix}:{body}=`."""

    name: str
    prefix: str
    make: Callable[[random.Random, str], tuple[str, str]]
    description: str

    def example(self, rng: random.Random, level: str) -> Example:
        body, answer = self.make(rng, level)
        return Example(prompt=f"{self.prefix}:{body}=", answer=answer)


def _length(rng: random.Random, level: str, hard: tuple[int, int] = (6, 8)) -> int:
    # Easy and hard lengths do not overlap, so "hard" needs length generalisation beyond the base mix.
    return rng.randint(3, 5) if level == "easy" else rng.randint(*hard)


def _addition(rng: random.Random, level: str) -> tuple[str, str]:
    # Easy sums pair any number below 100 with one digit, so the base meets carries; hard ones need two
    # two-digit operands. (Two-digit sums from one-digit training alone took >800 steps at lr 1e-3.)
    if level == "easy":
        a, b = rng.randint(0, 99), rng.randint(0, 9)
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}", str(a + b)


def _reversal(rng: random.Random, level: str) -> tuple[str, str]:
    word = "".join(rng.choices(string.ascii_lowercase, k=_length(rng, level)))
    return word, word[::-1]


def _sorting(rng: random.Random, level: str) -> tuple[str, str]:
    # Sorting generalises to longer inputs more readily than the other tasks (a base saw 0.34 at 6-8
    # digits), so its hard level is one digit longer to keep the base weak on it.
    digits = "".join(rng.choices(string.digits, k=_length(rng, level, hard=(7, 9))))
    return digits, "".join(sorted(digits))


def _uppercase(rng: random.Random, level: str) -> tuple[str, str]:
    word = "".join(rng.choices(string.ascii_lowercase, k=_length(rng, level)))
    return word, word.upper()


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("addition", "add", _addition, "sum of two numbers: easy 0-99 + one digit, hard 10-99 + 10-99"),
        Task("reversal", "rev", _reversal, "reverse a lowercase word: easy 3-5, hard 6-8 letters"),
        Task("sorting", "sort", _sorting, "sort a digit string: easy 3-5, hard 7-9 digits"),
        Task("uppercase", "up", _uppercase, "upper-case a word: easy 3-5, hard 6-8 letters"),
    )
}


def get_task(name: str) -> Task:
    """The registered task called `name`."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def is_held_out(prompt: str) -> bool:
    """Whether `prompt` belongs to the evaluation split (stable across processes and Python versions)."""
    return zlib.crc32(prompt.encode()) % _HELD_OUT_BUCKETS == 0


def sample_train(task: str, level: str, rng: random.Random) -> Example:
    """One training instance of `task` at `level`, never from the held-out split."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose one of {LEVELS}")
    spec = get_task(task)
    while True:
        example = spec.example(rng, level)
        if not is_held_out(example["prompt"]):
            return example


def eval_prompts(task: str, n: int, seed: int = 0, level: str = "hard") -> list[Example]:
    """`n` distinct held-out instances of `task` (hard by default), the same for the same (task, n, seed)."""
    spec = get_task(task)
    rng = random.Random(f"eval/{task}/{level}/{seed}")
    examples: dict[str, Example] = {}
    for _ in range(10_000 * max(n, 1)):  # bound the loop: tiny instance spaces cannot give n distinct ones
        if len(examples) == n:
            return list(examples.values())
        example = spec.example(rng, level)
        if is_held_out(example["prompt"]):
            examples.setdefault(example["prompt"], example)
    raise ValueError(f"task {task!r} at level {level!r} has fewer than {n} held-out prompts; ask for fewer")


def extract_answer(completion: str) -> str:
    """The answer in a generated completion: the text before the first EOS or newline, stripped."""
    for stop in (EOS_TOKEN, "\n"):
        completion = completion.split(stop, 1)[0]
    return completion.strip()


def score(completion: str, answer: str) -> bool:
    """Exact match of the extracted answer."""
    return extract_answer(completion) == answer


def suite(tasks: list[str], n_per_task: int, seed: int = 0) -> dict[str, list[Example]]:
    """Held-out hard prompts for several tasks, e.g. to hand to another evaluator (vLLM)."""
    return {task: eval_prompts(task, n_per_task, seed) for task in tasks}
