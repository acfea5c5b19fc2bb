"""What the cost model's form misses, corrected from the grid it was fitted to.

The physical form (cost_model.py) gets a kernel's curve right and its level wrong in
places, by a few percent that are exactly the size of the decisions between fast kernels:
on the H200 grid, SDPA at head dim 128 and 9216 tokens ran 4% slower than its fit and
FlashAttention-4 1% faster, so the form put FA4 0.7% behind SDPA where the grid measured it
4.5% ahead (cost_model/residuals.md). One set of rates per kernel cannot follow each head
dim's template: the kernels are different code per head dim.

The correction is the residuals themselves, smoothed: a call's predicted GPU time is
multiplied by exp(r), r a weighted mean of log(measured / predicted) over the grid calls of
the same kernel, head dim and mask kind, weighted by closeness in log batch·heads, log
query and log key tokens (Gaussian, widths `scale_heads` and `scale_tokens`; a change of
call form costs one width), and shrunk towards 0 where few grid calls are near
(r = Σ w·r_i / (shrink + Σ w)). Far from the grid it vanishes and the physical form
speaks alone. Only GPU-bound calls carry residuals and get corrected: a host-bound call's
time is the host path, which the form models directly.

The widths and the shrink are chosen on the grid by leave-one-out: each GPU-bound grid
call predicted from the others, the setting with the smallest mean absolute log error
kept (`select`). The held-out calls are never seen. Prediction is pure Python over at most
a few hundred stored points per kernel, once per call signature.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

from .json_values import finite_number

if TYPE_CHECKING:  # cost_model holds a correction; the correction reads cost_model's Work
    from .cost_model import Work

# Settings tried by `select` (widths in natural-log units: 0.5 is a factor of 1.65).
TOKEN_SCALES = (0.25, 0.5, 1.0)
HEAD_SCALES = (0.5, 1.0, 2.0)
SHRINKS = (0.2, 0.5, 1.0)

# (log B·H, log Nq, log Nk, head dim, flat form, masked, log residual)
Point = tuple[float, float, float, int, bool, bool, float]


def position(work: "Work") -> tuple[float, float, float, int, bool, bool]:
    """Where a call sits for the correction."""
    return (math.log(work.batch * work.heads_q), math.log(work.seq_q), math.log(work.seq_k), work.head_dim,
            work.flat, work.masked)


def _weight(a: Sequence, b: Sequence, scale_tokens: float, scale_heads: float) -> float:
    if a[3] != b[3] or a[5] != b[5]:
        return 0.0
    d2 = (((a[0] - b[0]) / scale_heads) ** 2 + ((a[1] - b[1]) / scale_tokens) ** 2
          + ((a[2] - b[2]) / scale_tokens) ** 2 + (1.0 if a[4] != b[4] else 0.0))
    return math.exp(-0.5 * d2)


@dataclasses.dataclass(frozen=True)
class ResidualCorrection:
    """Smoothed grid residuals per kernel (see the module docstring)."""

    scale_tokens: float
    scale_heads: float
    shrink: float
    points: Mapping[str, tuple[Point, ...]]
    loo: Mapping[str, float] = dataclasses.field(default_factory=dict)  # mean |log error| before and after

    def log_factor(self, name: str, work: "Work") -> float:
        """r for kernel `name` at a call (0 for a kernel without points)."""
        return _smoothed(position(work), self.points.get(name, ()), self.scale_tokens, self.scale_heads,
                         self.shrink)

    def factor(self, name: str, work: "Work") -> float:
        return math.exp(self.log_factor(name, work))

    def to_json(self) -> dict[str, Any]:
        return {"scale_tokens": self.scale_tokens, "scale_heads": self.scale_heads, "shrink": self.shrink,
                "loo": dict(self.loo),
                "points": {name: [list(p) for p in points] for name, points in sorted(self.points.items())}}


class InvalidCorrection(ValueError):
    pass


def parse(data: Any, kernels: Iterable[str]) -> ResidualCorrection:
    """A correction from its JSON form; raises InvalidCorrection with the first problem."""
    known = set(kernels)

    def check(condition: bool, what: str) -> None:
        if not condition:
            raise InvalidCorrection(what)

    check(isinstance(data, dict), "the correction is not an object")
    for key in ("scale_tokens", "scale_heads", "shrink"):
        value = data.get(key)
        check(finite_number(value) and value > 0, f"correction {key} is not a positive number")
    points_data = data.get("points")
    check(isinstance(points_data, dict), "correction points is not an object")
    points: dict[str, tuple[Point, ...]] = {}
    for name, rows in points_data.items():
        check(name in known, f"correction points name {name!r}, which the model has not fitted")
        check(isinstance(rows, list), f"correction points of {name} is not a list")
        parsed = []
        for row in rows:
            check(isinstance(row, list) and len(row) == 7, f"a correction point of {name} is not 7 numbers")
            numbers = row[:3] + row[6:]
            check(all(finite_number(x) for x in numbers)
                  and isinstance(row[3], int) and row[3] > 0 and isinstance(row[4], bool) and isinstance(row[5], bool),
                  f"a correction point of {name} is not (log B·H, log Nq, log Nk, head dim, flat, masked, residual)")
            check(abs(row[6]) < 2.0, f"a correction point of {name} has a residual over e^2: not a fit's residual")
            parsed.append((float(row[0]), float(row[1]), float(row[2]), row[3], row[4], row[5], float(row[6])))
        points[name] = tuple(parsed)
    loo = data.get("loo", {})
    check(isinstance(loo, dict), "correction loo is not an object")
    return ResidualCorrection(float(data["scale_tokens"]), float(data["scale_heads"]), float(data["shrink"]), points,
                              dict(loo))


def _smoothed(where: Sequence, points: Sequence[Point], scale_tokens: float, scale_heads: float,
              shrink: float) -> float:
    total = weights = 0.0
    for point in points:
        w = _weight(where, point, scale_tokens, scale_heads)
        total += w * point[6]
        weights += w
    return total / (shrink + weights)


def _mean_loo_error(points: Mapping[str, tuple[Point, ...]], scale_tokens: float, scale_heads: float,
                    shrink: float) -> float:
    """Mean |log error| of each point predicted from the other points of its kernel."""
    errors = [abs(p[6] - _smoothed(p, rows[:i] + rows[i + 1:], scale_tokens, scale_heads, shrink))
              for rows in points.values() for i, p in enumerate(rows)]
    return sum(errors) / len(errors)


def leave_one_out(correction: ResidualCorrection) -> dict[tuple, dict[str, float]]:
    """Per grid call (its `position`), per kernel: the corrected prediction's log error with
    that call's own residual left out of the correction (the form keeps every call)."""
    errors: dict[tuple, dict[str, float]] = {}
    for name, rows in correction.points.items():
        for i, p in enumerate(rows):
            others = rows[:i] + rows[i + 1:]
            errors.setdefault(p[:6], {})[name] = p[6] - _smoothed(p, others, correction.scale_tokens,
                                                                  correction.scale_heads, correction.shrink)
    return errors


def select(residuals: Mapping[str, Sequence[tuple["Work", float]]]) -> Optional[ResidualCorrection]:
    """The correction of a fit's GPU-bound residuals (per kernel: (work, log(measured /
    predicted))), its widths and shrink chosen by leave-one-out; None without points."""
    points = {name: tuple(position(work) + (r,) for work, r in rows) for name, rows in residuals.items() if rows}
    if not points:
        return None
    before = sum(abs(p[6]) for rows in points.values() for p in rows) / sum(len(rows) for rows in points.values())
    scored = sorted((_mean_loo_error(points, t, h, s), t, h, s) for t in TOKEN_SCALES for h in HEAD_SCALES
                    for s in SHRINKS)
    after, t, h, s = scored[0]
    return ResidualCorrection(t, h, s, points, {"points": float(sum(len(r) for r in points.values())),
                                                "mean_abs_log_error": before, "leave_one_out": after})
