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
from typing import Iterable, Optional, Protocol


def count_value(counter: "itertools.count[int]") -> int:
    """How many times `next()` was called on a fresh `itertools.count()`.
    itertools.count has no reader; its repr is "count(N)" on every Python version."""
    return int(repr(counter)[6:-1])


class _PlanLike(Protocol):
    name: str
    calls: int
    refused: int
    mask_service: Optional[str]

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
    """`masked`: masked calls by the backend that served them, then by how the mask was
    served (mask_serving.SERVICES: dropped, keys_trimmed, varlen, per_row, kept)."""

    total_calls: int
    served: dict[str, int]
    fallbacks: tuple[Fallback, ...]
    refused: int = 0  # calls that raised instead of being served (strict mode)
    masked: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def share(self, backend: str) -> float:
        return self.served.get(backend, 0) / self.total_calls if self.total_calls else 0.0

    def to_json(self) -> dict:
        return {
            "total_calls": self.total_calls,
            "served": dict(self.served),
            "fallbacks": [dataclasses.asdict(f) for f in self.fallbacks],
            "refused": self.refused,
            "masked": {backend: dict(services) for backend, services in self.masked.items()},
        }


def summarize(plans: Iterable[_PlanLike]) -> UsageCounters:
    served: Counter[str] = Counter()
    fallbacks: Counter[tuple[str, str, str]] = Counter()
    refused = 0
    masked: dict[str, Counter[str]] = {}
    for plan in plans:
        refused += plan.refused
        if not plan.calls:
            continue
        served[plan.name] += plan.calls
        if plan.mask_service is not None:
            masked.setdefault(plan.name, Counter())[plan.mask_service] += plan.calls
        for wanted, reason in plan.fallback_reasons():
            fallbacks[(wanted, plan.name, reason)] += plan.calls
    return UsageCounters(
        total_calls=sum(served.values()),
        served=dict(served.most_common()),
        fallbacks=tuple(Fallback(w, s, r, n) for (w, s, r), n in fallbacks.most_common()),
        refused=refused,
        masked={backend: dict(services.most_common()) for backend, services in masked.items()},
    )
