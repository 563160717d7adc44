"""Evaluation suites: the prompts to run, how many tokens each may generate, and how a completion is scored.

Two kinds, one shape (`Suite`: named examples, each tagged with a task):
- Built in, `testbed` / `testbed:addition,reversal`: held-out hard prompts of the testbed tasks
  (`testbed.tasks.suite`), scored with the testbed rule (text up to EOS/newline, exact match), so accuracies
  equal those of the transformers evaluator on the same prompts.
- User suites from JSONL or Parquet at any fsspec URL, GSM8K style: fields `prompt` and `answer`, optional
  `task` (groups rows; default the suite name) and `regex` (per-row extraction). The prediction is the first
  match of the row's or the suite's regex (its first group when it has one), or without a regex the first
  line of the completion. Prediction and answer are compared after trimming spaces; numbers compare by value
  after dropping `,` and `$` (`1,000` equals `1000.0`), because real benchmarks write them both ways.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distmerge.errors import DistmergeError
from distmerge.storage import Location

TESTBED_SUITE = "testbed"
DEFAULT_USER_MAX_TOKENS = 256
_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?|[-+]?\.\d+")


class SuiteError(DistmergeError, ValueError):
    """A suite cannot be parsed or read: the message names the suite, the row or field, and the fix."""


@dataclass(frozen=True)
class Example:
    """One prompt of a suite and the reference answer its completion is scored against."""

    task: str
    prompt: str
    answer: str
    regex: str | None = None  # per-row extraction regex; None: the suite's


@dataclass
class Suite:
    """Named examples with one decoding budget and one scoring rule."""

    name: str
    examples: list[Example]
    max_tokens: int
    regex: str | None = None  # suite-wide extraction regex (user suites)
    testbed_rule: bool = False  # score with the testbed's exact-match rule
    source: str = ""  # where the examples came from, for the report
    tasks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.tasks:
            self.tasks = list(dict.fromkeys(e.task for e in self.examples))

    def predict(self, example: Example, completion: str) -> str:
        """The answer a completion gives, by this suite's extraction rule."""
        from distmerge.testbed.tasks import extract_answer

        pattern = example.regex or self.regex
        if self.testbed_rule or pattern is None:
            return extract_answer(completion)
        match = re.search(pattern, completion)
        if match is None:
            return ""
        return (match.group(1) if match.re.groups else match.group(0)).strip()

    def is_correct(self, example: Example, prediction: str) -> bool:
        if self.testbed_rule:
            return prediction == example.answer
        return _normalise(prediction) == _normalise(example.answer)


def _normalise(text: str) -> str:
    text = text.strip()
    bare = text.replace(",", "").replace("$", "").rstrip(".")
    if _NUMBER.fullmatch(bare):
        return repr(float(bare))
    return text


def testbed_suite(tasks: list[str] | None = None, n_per_task: int = 200, seed: int = 0) -> Suite:
    """Held-out hard prompts of the testbed tasks (all of them when `tasks` is None)."""
    from distmerge.testbed.tasks import TASKS, suite
    from distmerge.testbed.training import MAX_NEW_TOKENS

    chosen = list(tasks or TASKS)
    examples = [Example(task, e["prompt"], e["answer"])
                for task, items in suite(chosen, n_per_task, seed).items() for e in items]
    return Suite(TESTBED_SUITE, examples, MAX_NEW_TOKENS, testbed_rule=True, tasks=chosen,
                 source=f"testbed tasks {','.join(chosen)}, {n_per_task} hard prompts each, seed {seed}")


def user_suite(name: str, url: str, *, regex: str | None = None, max_tokens: int = DEFAULT_USER_MAX_TOKENS,
               limit: int | None = None, storage_options: Mapping[str, Any] | None = None) -> Suite:
    """A suite read from a JSONL or Parquet file at `url` (fields prompt, answer, optional task and regex)."""
    rows = _read_rows(Location(url, storage_options))
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise SuiteError(f"suite {name!r}: {url} holds no rows. Fix: point it at a non-empty JSONL or Parquet file")
    examples = []
    for number, row in enumerate(rows, 1):
        missing = [key for key in ("prompt", "answer") if row.get(key) is None]
        if missing:
            raise SuiteError(f"suite {name!r}: row {number} of {url} has no {' or '.join(missing)} field "
                             f"(it has {sorted(row)}). Fix: give every row 'prompt' and 'answer'")
        examples.append(Example(str(row.get("task") or name), str(row["prompt"]), str(row["answer"]).strip(),
                                _check_regex(name, row.get("regex") or None)))
    return Suite(name, examples, max_tokens, regex=_check_regex(name, regex), source=url)


def _check_regex(suite: str, pattern: str | None) -> str | None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SuiteError(f"suite {suite!r}: regex {pattern!r} does not compile ({exc}). "
                             "Fix: quote it for the shell and check the syntax") from None
    return pattern


def _read_rows(source: Location) -> list[dict]:
    data = source.read_bytes()
    if source.url.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    if source.url.endswith((".jsonl", ".json")):
        rows = []
        for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SuiteError(f"{source.url} line {number} is not JSON ({exc}). Fix: one object per line") from None
        return rows
    raise SuiteError(f"cannot tell the format of {source.url}. Fix: name the file *.jsonl or *.parquet")


def parse_suite(spec: str, *, n_per_task: int = 200, seed: int = 0, regexes: Mapping[str, str] | None = None,
                max_tokens: int | None = None, limit: int | None = None,
                storage_options: Mapping[str, Any] | None = None) -> Suite:
    """A suite from its command-line spelling.

    `testbed` (every testbed task), `testbed:addition,reversal`, `NAME=URL` or a bare `URL` of a JSONL or
    Parquet file (named after the file). `regexes` maps suite names to extraction regexes; `max_tokens`
    overrides the suite's own budget; `limit` keeps the first rows of user suites.
    """
    if spec == TESTBED_SUITE or spec.startswith(TESTBED_SUITE + ":"):
        tasks = [t for t in spec.partition(":")[2].split(",") if t] or None
        from distmerge.testbed.tasks import get_task

        for task in tasks or []:
            get_task(task)  # a clear error for unknown names
        built = testbed_suite(tasks, n_per_task, seed)
        if max_tokens:
            built.max_tokens = max_tokens
        return built
    name, sep, url = spec.partition("=")
    if not sep or "://" in name or "/" in name:
        url = spec
        name = url.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return user_suite(name, url, regex=(regexes or {}).get(name), limit=limit,
                      max_tokens=max_tokens or DEFAULT_USER_MAX_TOKENS, storage_options=storage_options)
