"""Usage counters, derived from the dispatcher's plans.

The hot path only increments one integer on the plan it used; everything here is
computed when someone reads the counters, so keeping them costs no synchronisation
and no dictionary updates per call.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Iterable, Protocol


class _PlanLike(Protocol):
    name: str
    calls: int
    refused: int

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
    refused: int = 0  # calls that raised instead of being served (strict mode)

    def share(self, backend: str) -> float:
        return self.served.get(backend, 0) / self.total_calls if self.total_calls else 0.0

    def to_json(self) -> dict:
        return {
            "total_calls": self.total_calls,
            "served": dict(self.served),
            "fallbacks": [dataclasses.asdict(f) for f in self.fallbacks],
            "refused": self.refused,
        }


def summarize(plans: Iterable[_PlanLike]) -> UsageCounters:
    served: Counter[str] = Counter()
    fallbacks: Counter[tuple[str, str, str]] = Counter()
    refused = 0
    for plan in plans:
        refused += plan.refused
        if not plan.calls:
            continue
        served[plan.name] += plan.calls
        for wanted, reason in plan.fallback_reasons():
            fallbacks[(wanted, plan.name, reason)] += plan.calls
    return UsageCounters(
        total_calls=sum(served.values()),
        served=dict(served.most_common()),
        fallbacks=tuple(Fallback(w, s, r, n) for (w, s, r), n in fallbacks.most_common()),
        refused=refused,
    )
