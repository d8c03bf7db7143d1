"""The rules engine (DESIGN §4, §7): rule specs, the compiled rule set, ``match()``.

Pure: no socket, file or database. Conditions (grammar, typed comparisons, evaluation)
live in ``router.rules_parse`` and are re-exported here; see its docstring for the exact
semantics of every operator.

Evaluation: rules run in (priority, name) order — lower priority first, ties by name
(code-point order). Disabled rules are not evaluated but are reported as skipped. A rule
matches when all its conditions hold (none: always). Every matching rule adds its
destinations (each destination once, first-seen order); a matching rule with ``stop``
ends the evaluation, and the rules after it are reported as skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from router.rules_parse import (
    BINARY_OPS,
    NUMERIC_VRS,
    SPECIAL_FIELDS,
    UNARY_OPS,
    Condition,
    DateTime,
    FieldRef,
    InstanceFacts,
    RuleError,
    parse_condition,
    parse_conditions,
    parse_date,
    parse_datetime,
    parse_field,
    parse_number,
    parse_time,
)

__all__ = [
    "BINARY_OPS",
    "NUMERIC_VRS",
    "SPECIAL_FIELDS",
    "UNARY_OPS",
    "Condition",
    "DateTime",
    "FieldRef",
    "InstanceFacts",
    "RoutingDecision",
    "RuleError",
    "RuleExplanation",
    "RuleSet",
    "RuleSpec",
    "parse_condition",
    "parse_conditions",
    "parse_date",
    "parse_datetime",
    "parse_field",
    "parse_number",
    "parse_time",
]


@dataclass(frozen=True)
class RuleSpec:
    """A rule as stored: all ``conditions`` must hold; lists are accepted and kept as tuples."""

    name: str
    priority: int
    enabled: bool = True
    stop: bool = False
    conditions: tuple[Condition, ...] = ()
    destinations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditions", tuple(self.conditions))
        object.__setattr__(self, "destinations", tuple(self.destinations))
        if not self.name or self.name != self.name.strip():
            raise RuleError(f"bad rule name {self.name!r}")
        if not self.destinations:
            raise RuleError(f"rule {self.name!r} has no destination")
        for dest in self.destinations:
            if not dest or dest != dest.strip():
                raise RuleError(f"rule {self.name!r}: bad destination name {dest!r}")
        for cond in self.conditions:
            if not isinstance(cond, Condition):
                raise RuleError(f"rule {self.name!r}: {cond!r} is not a parsed Condition")


@dataclass(frozen=True)
class RuleExplanation:
    """Why one rule did or did not route an instance (``rules test``).

    ``failed_condition`` is the canonical text of the first condition that did not hold;
    ``skipped`` rules were not evaluated (``reason`` says why: disabled, or a stop rule).
    """

    rule: str
    matched: bool
    failed_condition: str | None
    skipped: bool
    reason: str = ""


@dataclass(frozen=True)
class RoutingDecision:
    destinations: tuple[str, ...]  # in rule order, each once
    matched: tuple[str, ...]  # names of the matching rules, in evaluation order
    explanations: tuple[RuleExplanation, ...]  # one per rule, disabled ones included


class RuleSet:
    """Rules compiled for evaluation; immutable, cheap to share between threads."""

    __slots__ = ("_rules", "wanted_sequence_tags", "wanted_tags")

    def __init__(self, rules: tuple[RuleSpec, ...]) -> None:
        # Use RuleSet.compile(specs); this takes rules already checked and ordered.
        self._rules = rules
        tags: set[int] = set()
        seq_tags: set[tuple[int, int]] = set()
        for rule in rules:
            if not rule.enabled:
                continue  # never evaluated, so the walker need not decode for it
            for cond in rule.conditions:
                key = cond.field.key
                if isinstance(key, int):
                    tags.add(key)
                elif key is not None:
                    seq_tags.add(key)
        self.wanted_tags: frozenset[int] = frozenset(tags)
        self.wanted_sequence_tags: frozenset[tuple[int, int]] = frozenset(seq_tags)

    @classmethod
    def compile(cls, specs: Iterable[RuleSpec]) -> RuleSet:
        rules = tuple(sorted(specs, key=lambda r: (r.priority, r.name)))
        names = [r.name for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise RuleError(f"duplicate rule names: {', '.join(dupes)}")
        return cls(rules)

    @property
    def rules(self) -> tuple[RuleSpec, ...]:
        """Every rule, in evaluation order (disabled ones included)."""
        return self._rules

    def match(self, facts: InstanceFacts) -> RoutingDecision:
        destinations: dict[str, None] = {}  # an ordered set
        matched: list[str] = []
        explanations: list[RuleExplanation] = []
        stopped_by: str | None = None
        for rule in self._rules:
            if stopped_by is not None:
                explanations.append(
                    RuleExplanation(rule.name, False, None, True, f"after stop rule {stopped_by}")
                )
                continue
            if not rule.enabled:
                explanations.append(RuleExplanation(rule.name, False, None, True, "disabled"))
                continue
            failed = next((c for c in rule.conditions if not c.evaluate(facts)), None)
            if failed is not None:
                explanations.append(
                    RuleExplanation(rule.name, False, failed.text, False, "condition failed")
                )
                continue
            matched.append(rule.name)
            destinations.update(dict.fromkeys(rule.destinations))
            explanations.append(RuleExplanation(rule.name, True, None, False, "matched"))
            if rule.stop:
                stopped_by = rule.name
        return RoutingDecision(tuple(destinations), tuple(matched), tuple(explanations))

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"RuleSet({[r.name for r in self._rules]!r})"
