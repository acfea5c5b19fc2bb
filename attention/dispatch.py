"""The dispatcher: one call in any ComfyUI form, the first backend that can serve it.

Hot path: build a tuple key from the call's shapes, dtype, device and flags, look the
plan up in a dict, bump an integer and run the plan's prepared function (views to the
kernel's layout, the kernel, a view back). No logging, no device synchronisation, no
copies that the kernel does not need. Everything else happens once per signature in
`_plan`: describing the call, walking the priority list, collecting every reason,
asking runtime checks, and preparing the views.

A kernel that raises is remembered as failed for that signature (process-wide, with
its error as the reason), logged once, and the call is served by the next candidate;
in strict mode the call raises instead, naming every candidate and why.

`auto_tuned` in the priority hands the first call of each signature to a Tuner
(tuning.py), which measures every eligible backend on the real tensors; the plan then
carries the tuner's decision, and later calls cost what any plan costs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from typing import Callable, Iterable, Optional, Sequence

import torch

from . import registry
from .backend import Backend
from .call import CallSignature, describe_call
from .counters import UsageCounters, summarize
from .errors import FAILED, RULE, UNAVAILABLE, UNSUPPORTED, NoBackendError, Rejection, describe_exception
from .layout import input_view, mask_adapter, native_layout, output_view
from .priority import AutoEntry, Rule, auto_entries, load_table
from .tuning import Decision, Tensors, Tuner

log = logging.getLogger(__name__)

# Name under which calls served by the caller's own fallback (ComfyUI's function) count.
PASSTHROUGH = "comfyui"

_ALWAYS = Rule()

# (backend name, signature) -> why it raised. Process-wide: a kernel that failed on a
# signature fails for every node that would send it there.
_failures: dict[tuple[str, CallSignature], str] = {}
_failures_lock = threading.Lock()


def forget_failures() -> None:
    """Clear remembered kernel failures (after installing a fixed package, or in tests)."""
    with _failures_lock:
        _failures.clear()


def remembered_failures() -> dict[tuple[str, CallSignature], str]:
    return dict(_failures)


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    rule: Rule
    explicit: bool


class Plan:
    """The decision for one call signature, and the prepared function that carries it out."""

    __slots__ = ("backend", "name", "signature", "rejected", "run", "calls", "refused", "error", "tuning")

    def __init__(self, backend: Optional[Backend], signature: CallSignature, rejected: tuple[Rejection, ...],
                 run: Optional[Callable], error: Optional[NoBackendError] = None,
                 tuning: Optional[Decision] = None, passthrough: str = PASSTHROUGH) -> None:
        self.backend = backend
        self.name = backend.name if backend is not None else passthrough
        self.signature = signature
        self.rejected = rejected
        self.run = run
        self.calls = 0
        self.refused = 0  # calls that raised instead of being served (strict, or no fallback)
        self.error = error
        self.tuning = tuning  # the tuner's decision, when auto_tuned chose this plan

    @property
    def is_fallback(self) -> bool:
        return any(r.is_fallback_cause for r in self.rejected)

    def fallback_reasons(self) -> list[tuple[str, str]]:
        """(backend passed over, reason) for each cause of this plan being a fallback."""
        return [(r.backend, "; ".join(r.reasons)) for r in self.rejected if r.is_fallback_cause]

    def __repr__(self) -> str:
        return f"Plan({self.name}, {self.signature.describe()}, calls={self.calls})"


def _prepare(backend: Backend, call: CallSignature) -> Callable:
    """The per-call function for `backend` on calls shaped like `call`."""
    layout = native_layout(call.layout_in, backend.layouts)
    view_q = input_view(call.layout_in, layout, call.heads_q, backend.contiguous)
    view_kv = input_view(call.layout_in, layout, call.heads_kv, backend.contiguous)
    view_out = output_view(layout, call.layout_out)
    adapt_mask = mask_adapter(call.mask_kind, len(call.mask_shape or ()), call.dtype)
    kernel = backend.kernel()

    if adapt_mask is None:
        def run(q, k, v, mask, scale):
            return view_out(kernel(view_q(q), view_kv(k), view_kv(v), None, scale, layout))
    else:
        def run(q, k, v, mask, scale):
            return view_out(kernel(view_q(q), view_kv(k), view_kv(v), adapt_mask(mask), scale, layout))
    return run


def _runtime_reasons(backend: Backend, call: CallSignature, tensors: Tensors) -> list[str]:
    if backend.runtime_check is None:
        return []
    q, k, v, mask, _ = tensors
    layout = native_layout(call.layout_in, backend.layouts)
    view_q = input_view(call.layout_in, layout, call.heads_q, backend.contiguous)
    view_kv = input_view(call.layout_in, layout, call.heads_kv, backend.contiguous)
    adapt_mask = mask_adapter(call.mask_kind, len(call.mask_shape or ()), call.dtype)
    return backend.runtime_check(view_q(q), view_kv(k), view_kv(v),
                                 None if adapt_mask is None else adapt_mask(mask))


class Dispatcher:
    """Serves attention calls from a priority list, deciding once per call signature.

    priority: backend names, best first; `auto` expands to the device's auto order.
    strict: no passthrough to the caller's fallback, and a kernel error raises
        (with every candidate's reasons) instead of moving to the next backend.
    tuner: decides `auto_tuned` positions; one is made (default file) when the
        priority names `auto_tuned` and none is given.
    passthrough: the name that calls served by the caller's fallback count under
        (the previous override's name when the caller chains one).
    """

    def __init__(self, priority: str | Sequence[str] = registry.AUTO, *, strict: bool = False,
                 auto_table: Optional[dict[str, tuple[AutoEntry, ...]]] = None,
                 tuner: Optional[Tuner] = None, passthrough: str = PASSTHROUGH) -> None:
        self.priority = registry.parse_priority(priority)
        self.strict = strict
        self.passthrough = passthrough
        self._auto_table = auto_table if auto_table is not None else load_table()
        if tuner is None and registry.AUTO_TUNED in self.priority:
            tuner = Tuner()
        self.tuner = tuner
        self._plans: dict[tuple, Plan] = {}
        self._retired: list[Plan] = []  # plans replaced after a failure, kept for the counters

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 mask: Optional[torch.Tensor] = None, *, skip_reshape: bool = False,
                 skip_output_reshape: bool = False, scale: Optional[float] = None,
                 attn_precision: Optional[torch.dtype] = None, low_precision: bool = True,
                 fallback: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """Attention for one call in ComfyUI's form (see attention.call).

        `fallback` serves calls no candidate can (ComfyUI's own function, from the
        override); without one such a call raises NoBackendError.
        """
        key = (q.shape, k.shape, v.shape, q.dtype, q.device, heads, skip_reshape, skip_output_reshape,
               None if mask is None else (mask.dtype, mask.shape), attn_precision, low_precision, scale is None)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(key, q, k, v, heads, mask, skip_reshape, skip_output_reshape, scale,
                              attn_precision, low_precision)
        plan.calls += 1
        if plan.run is None:
            if fallback is None or self.strict:
                plan.calls -= 1
                plan.refused += 1
                raise plan.error
            return fallback()
        try:
            return plan.run(q, k, v, mask, scale)
        except Exception as error:
            plan.calls -= 1
            self._record_failure(key, plan, error)
            return self(q, k, v, heads, mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                        scale=scale, attn_precision=attn_precision, low_precision=low_precision, fallback=fallback)

    def candidates(self, call: CallSignature) -> list[Candidate]:
        """The priority list for this call, `auto` expanded, duplicates dropped.
        `auto_tuned` stays as a marker (decided with the tensors), followed by the
        auto order for calls the tuner leaves undecided."""
        seen: set[str] = set()
        result = []
        for name in self.priority:
            static_auto: Iterable[Candidate] = (
                Candidate(e.backend, e.rule, False)
                for e in auto_entries(call.device_type, call.compute_capability, self._auto_table))
            if name == registry.AUTO:
                expanded: Iterable[Candidate] = static_auto
            elif name == registry.AUTO_TUNED:
                expanded = itertools.chain((Candidate(registry.AUTO_TUNED, _ALWAYS, False),), static_auto)
            else:
                expanded = (Candidate(name, _ALWAYS, True),)
            for candidate in expanded:
                if candidate.name not in seen:
                    seen.add(candidate.name)
                    result.append(candidate)
        return result

    def plan_for(self, call: CallSignature, tensors: Optional[Tensors] = None) -> Plan:
        """Decide for `call`. Without `tensors` (a synthetic call) runtime checks are
        skipped, `auto_tuned` measures nothing (its static order answers) and the plan
        cannot run, but says what would be chosen and why."""
        rejected: list[Rejection] = []
        for candidate in self.candidates(call):
            if candidate.name == registry.AUTO_TUNED:
                tuned = self._tuned_plan(call, tensors, rejected) if tensors is not None and self.tuner else None
                if tuned is not None:
                    return tuned
                continue
            backend = registry.get(candidate.name)
            why_rule = candidate.rule.reason(call)
            if why_rule is not None:
                rejected.append(Rejection(candidate.name, (why_rule,), RULE, candidate.explicit))
                continue
            availability = backend.availability()
            if not availability.available:
                rejected.append(Rejection(candidate.name, availability.reasons, UNAVAILABLE, candidate.explicit))
                continue
            reasons = backend.call_reasons(call)
            failure = _failures.get((candidate.name, call))
            if failure is not None:
                rejected.append(Rejection(candidate.name, tuple(reasons) + (failure,), FAILED, candidate.explicit))
                continue
            if not reasons and tensors is not None:
                reasons = _runtime_reasons(backend, call, tensors)
            if reasons:
                rejected.append(Rejection(candidate.name, tuple(reasons), UNSUPPORTED, candidate.explicit))
                continue
            run = _prepare(backend, call) if tensors is not None else None
            return Plan(backend, call, tuple(rejected), run)
        error = NoBackendError(call, tuple(rejected), self.strict)
        return Plan(None, call, tuple(rejected), None, error, passthrough=self.passthrough)

    def eligible(self, call: CallSignature, tensors: Tensors) -> dict[str, Callable]:
        """Every tunable backend that can serve this call here, prepared to run it."""
        runs = {}
        for backend in registry.all_backends():
            if not backend.tunable or not backend.availability().available or backend.call_reasons(call):
                continue
            if (backend.name, call) in _failures or _runtime_reasons(backend, call, tensors):
                continue
            runs[backend.name] = _prepare(backend, call)
        return runs

    def _tuned_plan(self, call: CallSignature, tensors: Tensors, rejected: list[Rejection]) -> Optional[Plan]:
        runs = self.eligible(call, tensors)
        static = [e.backend for e in auto_entries(call.device_type, call.compute_capability, self._auto_table)
                  if e.rule.reason(call) is None]
        decision = self.tuner.choose(call, tensors, runs, prefer=static) if runs else None
        if decision is None:
            return None
        return Plan(registry.get(decision.backend), call, tuple(rejected), runs[decision.backend], tuning=decision)

    def plans(self) -> list[Plan]:
        """Every plan made so far (including ones replaced after a kernel failure)."""
        return self._retired + list(self._plans.values())

    def counters(self) -> UsageCounters:
        """Calls served per backend and fallbacks by reason, since the last reset."""
        return summarize(self.plans())

    def reset_counters(self) -> None:
        self._retired.clear()
        for plan in self._plans.values():
            plan.calls = 0
            plan.refused = 0

    def clear(self) -> None:
        """Forget every decision (the next call of each signature plans again)."""
        self._plans.clear()
        self._retired.clear()

    def _plan(self, key: tuple, q, k, v, heads, mask, skip_reshape, skip_output_reshape, scale,
              attn_precision, low_precision) -> Plan:
        call = describe_call(q, k, v, heads, mask, skip_reshape=skip_reshape,
                             skip_output_reshape=skip_output_reshape, attn_precision=attn_precision,
                             low_precision_ok=low_precision, custom_scale=scale is not None)
        plan = self.plan_for(call, (q, k, v, mask, scale))
        if plan.is_fallback:
            causes = "; ".join(f"{name}: {why}" for name, why in plan.fallback_reasons())
            if plan.run is not None:
                served = f"served by {plan.name}"
            elif self.strict:
                served = "refused (strict)"
            else:
                served = "passed on to the caller's attention"
            log.info("attention backends: %s %s (%s)", call.describe(), served, causes)
        self._plans[key] = plan
        return plan

    def _record_failure(self, key: tuple, plan: Plan, error: Exception) -> None:
        reason = "raised " + describe_exception(error)
        with _failures_lock:
            first_time = (plan.name, plan.signature) not in _failures
            _failures[(plan.name, plan.signature)] = reason
        if self.strict:
            plan.refused += 1
            rejected = plan.rejected + (Rejection(plan.name, (reason,), FAILED, True),)
            raise NoBackendError(plan.signature, rejected, True) from error
        if first_time:
            log.warning("attention backends: %s %s on %s; using the next backend for such calls",
                        plan.name, reason, plan.signature.describe())
        self._retired.append(self._plans.pop(key))


__all__ = ["Dispatcher", "Plan", "Candidate", "PASSTHROUGH", "forget_failures", "remembered_failures",
           "NoBackendError", "UNSUPPORTED", "UNAVAILABLE", "RULE", "FAILED"]
