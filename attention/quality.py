"""The quality monitor of sparse backends: sampled error against exact attention, an
error budget, and dense attention for signatures over it.

A sparse kernel's error depends on the model, the prompt and the step, so it is
measured where it happens: on the real tensors of the run. For each sparse plan (one
call signature) the monitor compares `rows` query rows, spread evenly over the
sequence, of the kernel's output with exact attention (PyTorch SDPA on the same rows,
keys and values) on
- the first calls of the signature in a run (`calls_per_check` of them: the 1st, 2nd,
  4th, 8th, ... so that more than the first blocks are seen), and
- the same number of calls, spread evenly over one model call, at each of `rechecks`
  checkpoints inside the step window: sparsity that is fine at the first sparse step
  can fail later.
A sample whose relative L1 error is over the budget, or that is not finite, takes the
sparse backend off that signature for the rest of the run (Dispatcher.demote): the call
in flight and every later call of the signature are served by the dispatcher's next
candidate (the dense `auto` order), and the run report says so.

Cost: an unsampled call runs the bare kernel (the plan's function is swapped for a
checking one only while a check is armed). A sampled call adds exact attention for
`rows` queries (256 of Wan 720p's 75,600 query rows: 0.3% of a dense call) and one
device synchronisation to read its error. Per signature and run at most
`calls_per_check * (1 + rechecks)` calls are sampled.

The reference is SDPA in the call's dtype (flash or cuDNN on a GPU: exact up to
bf16/fp16 rounding, ~0.3% relative L1, far below any useful budget). Checkpoints need
the schedule position of each model call (`model_call`, from the node's step-window
hook); without it only the first calls are checked.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .backend import BHND
from .call import CallSignature
from .errors import describe_exception
from .layout import input_view

log = logging.getLogger(__name__)

# Relative L1 of the sampled rows against exact attention. SageAttention-class INT8/FP8
# kernels measure 0.003-0.018 on video shapes (benchmarks/results/h200/kernels.md); a
# sparse kernel skips most of the keys, so its budget is wider. A budget, not a quality
# guarantee: what error a model tolerates is for the user's eyes to settle.
DEFAULT_BUDGET_REL_L1 = 0.10


@dataclasses.dataclass(frozen=True)
class QualityPolicy:
    """What the monitor samples and what it tolerates.

    budget_rel_l1: relative L1 error of a sampled call above which its signature goes
        dense for the rest of the run.
    rows: query rows compared per sampled call.
    calls_per_check: calls sampled per signature at each check.
    rechecks: checkpoints after the first check, evenly inside `window`.
    window: the step window (fractions of the schedule) in which sparse calls happen.
    """

    budget_rel_l1: float = DEFAULT_BUDGET_REL_L1
    rows: int = 256
    calls_per_check: int = 4
    rechecks: int = 3
    window: tuple[float, float] = (0.0, 1.0)

    def problems(self) -> list[str]:
        found = []
        if not math.isfinite(self.budget_rel_l1) or self.budget_rel_l1 <= 0:
            found.append(f"the error budget must be a relative L1 above 0 (got {self.budget_rel_l1})")
        if self.rows < 1 or self.calls_per_check < 1 or self.rechecks < 0:
            found.append("rows and calls per check must be at least 1, rechecks at least 0")
        start, end = self.window
        if not 0.0 <= start < end <= 1.0:
            found.append(f"the step window needs 0 <= start < end <= 1 (got {start}, {end})")
        return found

    def checkpoints(self) -> tuple[float, ...]:
        """Schedule positions at which every signature is checked again."""
        start, end = self.window
        return tuple(start + (end - start) * j / (self.rechecks + 1) for j in range(1, self.rechecks + 1))


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sampled call: when, which call of its model call, and its error."""

    check: int  # 0: the first calls of the run; n: the n-th checkpoint
    position: Optional[float]  # schedule position (i / steps) of its model call; None if unknown
    ordinal: int  # which call of the signature within that model call (or since the first call)
    rel_l1: float
    cosine: float
    nonfinite: int


def row_indices(tokens: int, rows: int, device: torch.device) -> torch.Tensor:
    """`rows` query positions spread evenly from the first token to the last."""
    count = min(rows, tokens)
    return torch.linspace(0, tokens - 1, count, device=device).round().long().unique()


def sampled_error(call: CallSignature, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float],
                  out: torch.Tensor, rows: torch.Tensor) -> tuple[float, float, int]:
    """(relative L1, cosine similarity, non-finite values) of `out` on the query rows
    `rows` against exact attention, for a mask-less call in ComfyUI's form. One
    device synchronisation."""
    to_q = input_view(call.layout_in, BHND, call.heads_q, False)
    to_kv = input_view(call.layout_in, BHND, call.heads_kv, False)
    to_out = input_view(call.layout_out, BHND, call.heads_q, False)
    exact = F.scaled_dot_product_attention(to_q(q).index_select(2, rows), to_kv(k), to_kv(v), scale=scale).float()
    got = to_out(out).index_select(2, rows).float()
    finite = torch.isfinite(got)
    got = torch.where(finite, got, torch.zeros((), dtype=got.dtype, device=got.device))
    diff, size, dot, got_sq, exact_sq, nonfinite = torch.stack([
        (got - exact).abs().sum(), exact.abs().sum(), (got * exact).sum(), got.square().sum(), exact.square().sum(),
        (~finite).sum().float()]).tolist()
    rel_l1 = diff / size if size > 0 else (0.0 if diff == 0 else math.inf)
    norms = math.sqrt(got_sq * exact_sq)
    cosine = dot / norms if norms > 0 else (1.0 if got_sq == exact_sq else 0.0)
    return rel_l1, cosine, int(nonfinite)


class _Watch:
    """One watched sparse plan: its bare function, what is armed, what was measured."""

    def __init__(self, dispatcher: Any, plan: Any, rows: torch.Tensor) -> None:
        self.dispatcher = dispatcher
        self.plan = plan
        self.bare: Callable = plan.run
        self.rows = rows
        self.samples: list[Sample] = []
        self.check = 0
        self.targets: frozenset[int] = frozenset()
        self.last_target = -1
        self.seen = 0
        self.calls_before = 0  # plan.calls when the current model call began
        self.per_model_call = 0  # calls of this signature in the last model call that had any
        self.served_instead: Optional[str] = None
        self.reason: Optional[str] = None
        self.unchecked: Optional[str] = None  # why a check could not be made

    @property
    def armed(self) -> bool:
        return self.plan.run is not self.bare


class QualityMonitor:
    """Samples sparse plans' error against exact attention; demotes signatures over budget.

    One per node (its dispatcher's `monitor`). `begin_run` at each sampler run start,
    `model_call` at each model call with its schedule position; `summary` and
    `warnings` for the run report.
    """

    def __init__(self, policy: Optional[QualityPolicy] = None) -> None:
        self.policy = policy or QualityPolicy()
        problems = self.policy.problems()
        if problems:
            raise ValueError("quality monitor: " + "; ".join(problems))
        self._checkpoints = self.policy.checkpoints()
        self._dispatchers: list[Any] = []
        self.begin_run()

    def begin_run(self) -> None:
        """Forget the last run: every signature is planned, hence checked, afresh."""
        for dispatcher in self._dispatchers:
            dispatcher.clear()
        self._watches: list[_Watch] = []
        self._position: Optional[float] = None
        self._next_checkpoint = 0

    def watch(self, dispatcher: Any, plan: Any, tensors: tuple) -> None:
        """A dispatcher made `plan`: check it if its backend is sparse, starting with
        the call being made now."""
        if plan.backend is None or not plan.backend.sparse:
            return
        if not any(known is dispatcher for known in self._dispatchers):
            self._dispatchers.append(dispatcher)
        watch = _Watch(dispatcher, plan, row_indices(plan.signature.seq_q, self.policy.rows, tensors[0].device))
        self._watches.append(watch)
        self._arm(watch, spread=False)

    def model_call(self, position: Optional[float]) -> None:
        """A model call begins at schedule `position` (i / steps; None if unknown)."""
        self._position = position
        live = [watch for watch in self._watches if watch.served_instead is None]
        for watch in live:
            done = watch.plan.calls - watch.calls_before
            if done > 0:
                watch.per_model_call = done
            watch.calls_before = watch.plan.calls
            if watch.armed:  # fewer calls than targets last time: the check is over
                watch.plan.run = watch.bare
        if position is None:
            return
        crossed = False
        while self._next_checkpoint < len(self._checkpoints) and position >= self._checkpoints[self._next_checkpoint]:
            self._next_checkpoint += 1
            crossed = True
        if crossed:
            for watch in live:
                watch.check += 1
                self._arm(watch, spread=True)

    def _arm(self, watch: _Watch, spread: bool) -> None:
        n = self.policy.calls_per_check
        per_call = watch.per_model_call
        if spread and per_call:
            targets = {min(per_call - 1, int((i + 0.5) * per_call / n)) for i in range(n)}
        else:
            targets = {(1 << i) - 1 for i in range(n)}
        watch.targets = frozenset(targets)
        watch.last_target = max(targets)
        watch.seen = 0

        def checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                    scale: Optional[float]) -> torch.Tensor:
            return self._checked_call(watch, q, k, v, mask, scale)

        watch.plan.run = checked

    def _checked_call(self, watch: _Watch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: Optional[torch.Tensor], scale: Optional[float]) -> torch.Tensor:
        ordinal = watch.seen
        watch.seen += 1
        out = watch.bare(q, k, v, mask, scale)
        if ordinal >= watch.last_target:
            watch.plan.run = watch.bare
        if ordinal not in watch.targets:
            return out
        try:
            rel_l1, cosine, nonfinite = sampled_error(watch.plan.signature, q, k, v, scale, out, watch.rows)
        except Exception as error:  # the check, not the kernel, failed: say so, keep the output
            watch.plan.run = watch.bare
            watch.unchecked = "the check raised " + describe_exception(error)
            log.warning("attention backends: could not check %s on %s: %s", watch.plan.name,
                        watch.plan.signature.describe(), watch.unchecked)
            return out
        sample = Sample(watch.check, self._position, ordinal, rel_l1, cosine, nonfinite)
        watch.samples.append(sample)
        problem = self._problem(sample)
        if problem is None:
            return out
        watch.plan.run = watch.bare
        reason = f"{problem} ({_where(sample)}, {watch.rows.numel()} query rows against exact attention)"
        try:
            replacement = watch.dispatcher.demote(watch.plan, reason, (q, k, v, mask, scale))
        except ValueError:  # the plan was replaced meanwhile (evicted): its successor is watched anew
            return out
        watch.served_instead = replacement.name
        watch.reason = reason
        log.warning("attention backends: %s on %s: %s; %s serves these calls for the rest of the run",
                    watch.plan.name, watch.plan.signature.describe(), reason, replacement.name)
        if replacement.run is None:  # nothing else can serve it: this call keeps the sparse output
            return out
        return replacement.run(q, k, v, mask, scale)

    def _problem(self, sample: Sample) -> Optional[str]:
        if sample.nonfinite:
            return f"{sample.nonfinite} non-finite values in the output"
        if sample.rel_l1 > self.policy.budget_rel_l1:
            return f"relative L1 {sample.rel_l1:.4f} over the error budget {self.policy.budget_rel_l1:g}"
        return None

    def summary(self) -> dict:
        """This run's checks per signature, for the run report."""
        signatures = []
        for watch in self._watches:
            checks = []
            for check in sorted({s.check for s in watch.samples}):
                samples = [s for s in watch.samples if s.check == check]
                checks.append({"check": check, "position": samples[0].position, "calls": len(samples),
                               "max_rel_l1": _rounded(max(s.rel_l1 for s in samples)),
                               "mean_rel_l1": _rounded(sum(s.rel_l1 for s in samples) / len(samples)),
                               "min_cosine": _rounded(min(s.cosine for s in samples)),
                               "nonfinite": sum(s.nonfinite for s in samples)})
            settings = watch.plan.settings
            signatures.append({
                "signature": watch.plan.signature.describe(), "backend": watch.plan.name,
                "settings": settings.describe() if settings is not None else "",
                "checks": checks,
                "worst_rel_l1": _rounded(max((s.rel_l1 for s in watch.samples), default=None)),
                "over_budget": watch.served_instead is not None,
                "served_instead": watch.served_instead, "reason": watch.reason, "unchecked": watch.unchecked})
        return {"budget_rel_l1": self.policy.budget_rel_l1, "rows": self.policy.rows,
                "calls_per_check": self.policy.calls_per_check,
                "checkpoints": [round(position, 6) for position in self._checkpoints],
                "sampled_calls": sum(len(w.samples) for w in self._watches), "signatures": signatures}

    def warnings(self) -> list[str]:
        """One line per signature that went dense this run, or that could not be checked."""
        lines = [f"{w.plan.name} went over the error budget on {w.plan.signature.describe()}: {w.reason}; "
                 f"{w.served_instead} served these calls for the rest of the run."
                 for w in self._watches if w.served_instead is not None]
        lines += [f"{w.plan.name}'s error on {w.plan.signature.describe()} could not be checked: {w.unchecked}."
                  for w in self._watches if w.unchecked is not None]
        return lines


def _where(sample: Sample) -> str:
    if sample.position is None:
        return "at the first calls of the run" if sample.check == 0 else f"at check {sample.check}"
    return f"at {sample.position:.0%} of the schedule"


def _rounded(value: Optional[float]) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else round(value, 6)
