"""Model roles (base, inputs, specialists, merged candidates) and the quality gates that compare them.

Roles, by name unless stated:
- base: the model named `base` (or the one given as `base`).
- specialists: a model named `sft-<task>` is the specialist of <task> when that task is evaluated; an explicit
  mapping (`--specialist addition=my-math-model`) wins over the name.
- inputs: the specialists plus any model flagged as an input: the checkpoints a merge combined.
- merged (candidates): every other model, e.g. the outputs of merges under test.

A gate reads `SUBJECT>=[FACTOR*]REFERENCE`:
- SUBJECT is a model name, `merged` (each candidate) or `base`.
- REFERENCE `specialist` compares, on each task that has a specialist, the subject with that specialist;
  `base` or a model name compares on every task.
`merged>=0.9*specialist` thus requires each merge to reach 90% of each specialist's score on its own task.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from distmerge.errors import DistmergeError

MERGED, BASE, SPECIALIST = "merged", "base", "specialist"
SPECIALIST_PREFIX = "sft-"
_GATE = re.compile(r"^\s*([^\s>=*]+)\s*>=\s*(?:([0-9]*\.?[0-9]+)\s*\*\s*)?([^\s>=*]+)\s*$")
_TOLERANCE = 1e-9  # accuracies are ratios of counts: ignore float noise in the product


class GateError(DistmergeError, ValueError):
    """A gate or role refers to something that does not exist, or cannot be parsed."""


@dataclass
class Roles:
    """Which evaluated model plays which part in the comparison."""

    base: str | None = None
    inputs: list[str] = field(default_factory=list)
    specialists: dict[str, str] = field(default_factory=dict)  # task -> model name

    def candidates(self, models: Iterable[str]) -> list[str]:
        """The models under test: neither the base nor an input."""
        return [m for m in models if m != self.base and m not in self.inputs]

    def to_json(self) -> dict:
        return {"base": self.base, "inputs": self.inputs, "specialists": self.specialists}


def resolve_roles(models: Sequence[str], tasks: Sequence[str], *, base: str | None = None,
                  inputs: Iterable[str] = (), specialists: Mapping[str, str] | None = None) -> Roles:
    """Roles from explicit choices, completed by the naming conventions above."""
    for name in [base, *inputs, *(specialists or {}).values()]:
        if name is not None and name not in models:
            raise GateError(f"role names model {name!r}, which is not evaluated; models are {list(models)}. "
                            "Fix: name a model given with --model")
    chosen = dict(specialists or {})
    for task in tasks:
        if task not in chosen and f"{SPECIALIST_PREFIX}{task}" in models:
            chosen[task] = f"{SPECIALIST_PREFIX}{task}"
    base = base if base is not None else (BASE if BASE in models else None)
    flagged = set(inputs) | set(chosen.values())
    return Roles(base=base, inputs=[m for m in models if m in flagged and m != base], specialists=chosen)


@dataclass(frozen=True)
class Gate:
    """SUBJECT >= FACTOR * REFERENCE, as written by the user."""

    subject: str
    factor: float
    reference: str
    text: str


def parse_gate(text: str) -> Gate:
    match = _GATE.match(text)
    if match is None:
        raise GateError(f"cannot parse gate {text!r}. Fix: write SUBJECT>=[FACTOR*]REFERENCE, "
                        "e.g. 'merged>=0.9*specialist' or 'merged>=base'")
    subject, factor, reference = match.groups()
    return Gate(subject, float(factor) if factor else 1.0, reference, text.strip())


@dataclass(frozen=True)
class GateCheck:
    """One comparison of a gate: a subject model and a reference model on one task."""

    gate: str
    task: str
    subject: str
    score: float
    reference: str
    reference_score: float
    factor: float
    threshold: float
    passed: bool

    def describe(self) -> str:
        relation = ">=" if self.passed else "<"
        return (f"gate {self.gate!r} {'passed' if self.passed else 'FAILED'} on task {self.task}: {self.subject} "
                f"scores {self.score:.3f} {relation} threshold {self.threshold:.3f} "
                f"(= {self.factor:g} x {self.reference} {self.reference_score:.3f})")


def check_gate(gate: Gate, accuracy: Mapping[str, Mapping[str, float]], roles: Roles) -> list[GateCheck]:
    """Every comparison `gate` asks for, given accuracy[model][task] of the evaluated models."""
    models = list(accuracy)
    if gate.subject == MERGED:
        subjects = roles.candidates(models)
    elif gate.subject == BASE:
        subjects = [roles.base] if roles.base else []
    else:
        subjects = [gate.subject] if gate.subject in accuracy else []
    if not subjects:
        raise GateError(f"gate {gate.text!r}: no model plays {gate.subject!r} among {models}. Fix: name a model, "
                        "or give the merged models names other than base, sft-<task> and inputs")
    tasks = list(next(iter(accuracy.values())))
    pairs = _reference_pairs(gate, tasks, models, roles)
    checks = []
    for subject in subjects:
        for task, reference in pairs:
            if reference == subject:
                continue
            score, reference_score = accuracy[subject][task], accuracy[reference][task]
            threshold = gate.factor * reference_score
            checks.append(GateCheck(gate.text, task, subject, score, reference, reference_score, gate.factor,
                                    threshold, score >= threshold - _TOLERANCE))
    return checks


def _reference_pairs(gate: Gate, tasks: list[str], models: list[str], roles: Roles) -> list[tuple[str, str]]:
    if gate.reference == SPECIALIST:
        pairs = [(task, roles.specialists[task]) for task in tasks if task in roles.specialists]
        if not pairs:
            raise GateError(f"gate {gate.text!r} compares with specialists, but no evaluated task has one. Fix: "
                            "name specialists sft-<task> or map them with --specialist TASK=MODEL")
        return pairs
    reference = roles.base if gate.reference == BASE else gate.reference
    if reference not in models:
        raise GateError(f"gate {gate.text!r}: reference {gate.reference!r} is not an evaluated model {models}. "
                        "Fix: name a model given with --model, 'base' or 'specialist'")
    return [(task, reference) for task in tasks]


def check_gates(gates: Iterable[str | Gate], accuracy: Mapping[str, Mapping[str, float]],
                roles: Roles) -> list[GateCheck]:
    """All comparisons of all gates; callers fail the run when any has passed=False."""
    return [check for gate in gates
            for check in check_gate(parse_gate(gate) if isinstance(gate, str) else gate, accuracy, roles)]
