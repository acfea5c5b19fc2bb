"""Usage counters, derived from the dispatcher's plans.

The hot path only advances one `itertools.count` on the plan it used (one C call, so
threads calling one plan never lose a count); everything here is computed when someone
reads the counters, so keeping them costs no synchronisation and no dictionary updates
per call.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from typing import Iterable, Protocol


def count_value(counter: "itertools.count[int]") -> int:
    """How many times `next()` was called on a fresh `itertools.count()`.
    itertools.count has no reader; its repr is "count(N)" on every Python version."""
    return int(repr(counter)[6:-1])


class _PlanLike(Protocol):
    name: str
    calls: int

    def fallback_reasons(self) -> list[tuple[str, str]]: ...


@dataclasses.dataclass(frozen=True)
class Fallback:
    """Calls meant for `wanted` that `served_by` served instead, and why."""

    wanted: str
    served_by: str
    reason: str
    calls: int


@dataclasses.dataclass(frozen=True)
class UsageCounters:
    total_calls: int
    served: dict[str, int]
    fallbacks: tuple[Fallback, ...]

    def share(self, backend: str) -> float:
        return self.served.get(backend, 0) / self.total_calls if self.total_calls else 0.0

    def to_json(self) -> dict:
        return {
            "total_calls": self.total_calls,
            "served": dict(self.served),
            "fallbacks": [dataclasses.asdict(f) for f in self.fallbacks],
        }


def summarize(plans: Iterable[_PlanLike]) -> UsageCounters:
    served: Counter[str] = Counter()
    fallbacks: Counter[tuple[str, str, str]] = Counter()
    for plan in plans:
        if not plan.calls:
            continue
        served[plan.name] += plan.calls
        for wanted, reason in plan.fallback_reasons():
            fallbacks[(wanted, plan.name, reason)] += plan.calls
    return UsageCounters(
        total_calls=sum(served.values()),
        served=dict(served.most_common()),
        fallbacks=tuple(Fallback(w, s, r, n) for (w, s, r), n in fallbacks.most_common()),
    )
