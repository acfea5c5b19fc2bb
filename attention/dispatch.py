"""The dispatcher: one call in any ComfyUI form, the first backend that can serve it.

Hot path: build a tuple key from the call's shapes, dtype, device and flags, look the
plan up in a dict, count the call and run the plan's prepared function (views to the
kernel's layout, the kernel, a view back). A masked call first looks up its mask's class
(masks.py: read from the device once per tensor per model call), which is part of the
key, so no-op and key-padding masks get plans that serve them without the mask
(mask_serving.py). No logging, no device synchronisation, no copies that the kernel does
not need. Everything else happens once per signature in
`_plan`, under a lock: describing the call, walking the priority list, collecting every
reason, asking runtime checks, and preparing the views (once per backend and signature:
the same prepared object answers the runtime check and runs the call).

The priority list is parsed once (priority_list.py): backends named by the user, and
the `auto` and `auto_tuned` strategies, each expanded here when a signature is planned.

Under `torch.compile` a call becomes one opaque op (compiled.py) that runs this same
path when the graph runs, so the graph never depends on a decision.

A kernel that raises is remembered as failed for that signature (process-wide, with its
error as the reason), logged once, and the call is served by the next candidate; in
strict mode the call raises instead, naming every candidate and why. A failure is tried
again at the next run (`begin_run`); after `RETRY_LIMIT` failures it stays failed until
`forget_failures()`.

Calls are counted with `itertools.count`, whose `next()` is one C call: exact when
ComfyUI's multi-GPU sampling calls one dispatcher from a thread per device.

`auto_tuned` in the priority hands the first call of each signature to a Tuner
(tuning.py), which measures every eligible backend on the real tensors; the plan then
carries the tuner's decision, and later calls cost what any plan costs. `auto` does the
same on a call (from 100 µs) whose kernels its cost model cannot separate (cost_model.contested),
timing only those and SDPA, with a tuner of its own (`measurer`) and its own file.

Sparse backends take per-dispatcher settings (attention.sparsity), bound into the
prepared function. A monitor (attention.quality) may watch the plans it cares about, and
`demote` a signature whose error it finds over budget: the signature is planned again
without that backend until the dispatcher's plans are cleared.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import torch

from . import registry
from .backend import Backend
from .call import CallSignature, describe_call
from .compiled import compiled_attention, is_compiling, register_target
from .counters import UsageCounters, count_value, summarize
from .errors import FAILED, QUALITY, RULE, UNAVAILABLE, UNSUPPORTED, NoBackendError, Rejection, describe_exception
from .layout import input_view, mask_adapter, native_layout, output_view
from . import cost_store
from .cost_model import SAFEST, CostModel
from .mask_serving import KEPT, served_signature, served_tensors, serving_run
from .masks import GENERAL, MaskCache, MaskClass
from .priority import ENV_TABLE, AutoEntry, Rule, auto_entries_for, load_table
from .priority_list import NOTHING_AFTER, NamedBackend, Priority, TunedStrategy, parse_priority
from .tuning import Decision, Tensors, Tuner, auto_measured_path, auto_measures

log = logging.getLogger(__name__)

# The backend a compiled graph may run traced inline rather than through the op: PyTorch's
# own SDPA, which is what ComfyUI's compiled path runs and which never needs our Python.
TRACED_BACKEND = "sdpa"

# Name under which calls served by the caller's own fallback (ComfyUI's function) count.
PASSTHROUGH = "comfyui"
# A (backend, signature) that failed this many times is not tried again until forgotten.
RETRY_LIMIT = 3
# Plans kept per dispatcher: one per call shape, and a server sees many resolutions.
MAX_PLANS = 256

_ALWAYS = Rule()


@dataclasses.dataclass
class Failure:
    """A kernel that raised on a signature: why, how often, and in which run last."""

    reason: str
    count: int
    generation: int

    @property
    def permanent(self) -> bool:
        return self.count >= RETRY_LIMIT


# (backend name, signature) -> its failure. Process-wide: a kernel that failed on a
# signature fails for every node that would send it there, until the next run.
_failures: dict[tuple[str, CallSignature], Failure] = {}
_failures_lock = threading.Lock()
# Bumped at the start of every run of every dispatcher: failures of an earlier run are retried.
_generation = itertools.count(1)
_current_generation = 0


def _new_generation() -> int:
    global _current_generation
    _current_generation = next(_generation)
    return _current_generation


def forget_failures() -> int:
    """Clear remembered kernel failures (after installing a fixed package, from the
    sidebar, or in tests). Returns how many were forgotten."""
    with _failures_lock:
        forgotten = len(_failures)
        _failures.clear()
    return forgotten


def remembered_failures() -> dict[tuple[str, CallSignature], Failure]:
    return dict(_failures)


def failure_rows() -> list[dict]:
    """Every remembered failure as the status route shows it: backend, call shape, why, how
    often, and whether the next run tries the backend again."""
    return [{"backend": backend, "signature": call.describe(), "reason": failure.reason, "count": failure.count,
             "retried_next_run": not failure.permanent}
            for (backend, call), failure in sorted(remembered_failures().items(),
                                                   key=lambda item: (item[0][0], item[0][1].describe()))]


def plan_key(q_shape: tuple, k_shape: tuple, v_shape: tuple, dtype: torch.dtype, device: torch.device, heads: int,
             skip_reshape: bool, skip_output_reshape: bool, attn_precision: Optional[torch.dtype], low_precision: bool,
             scale_is_none: bool) -> tuple:
    """The plan-cache key of a mask-less call, as `Dispatcher.__call__` builds it inline (the
    hot path pays no function call for it); for calls known by their sizes only."""
    return (torch.Size(q_shape), torch.Size(k_shape), torch.Size(v_shape), dtype, device, heads, skip_reshape,
            skip_output_reshape, None, attn_precision, low_precision, scale_is_none)


def _signature_device(call: CallSignature) -> Optional[torch.device]:
    """The device a call signature's saved measurements are filed under: the CPU, or the
    first visible GPU of its capability (None when there is none)."""
    if call.device_type == "cpu":
        return torch.device("cpu")
    return cost_store.device_for(call.device_type, call.compute_capability)


def _blocking_failure(name: str, call: CallSignature) -> Optional[Failure]:
    """The failure that keeps `name` off `call` now: a permanent one, or one from this run."""
    failure = _failures.get((name, call))
    if failure is None or not (failure.permanent or failure.generation == _current_generation):
        return None
    return failure


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    rule: Rule
    explicit: bool


@dataclasses.dataclass(frozen=True)
class Contest:
    """Where `auto`'s order reaches kernels its cost model cannot separate on the call:
    they and SDPA (the reference) are timed once on the real tensors, and the fastest
    accurate one serves unless `keep` (the model's own choice among them) measured within
    the measurement's noise floor of it. Without tensors, this machine's saved
    measurement of the call answers; without one, or without a measurer, the walk goes
    on down the model's order."""

    names: tuple[str, ...]
    keep: Optional[str] = None


class Prepared:
    """One backend made ready for one call signature: the views to the kernel's layout,
    the mask adapter, the kernel (with `settings` bound, for a backend that takes them;
    bound to `rest`, the priority after it, for one that binds to it: Backend.bind) and
    the function that chains them. The dispatcher makes one per (backend, signature,
    rest): the same object answers the runtime check and serves the calls."""

    __slots__ = ("backend", "layout", "view_q", "view_kv", "adapt_mask", "run")

    def __init__(self, backend: Backend, call: CallSignature, settings: Any = None,
                 rest: Priority = NOTHING_AFTER) -> None:
        self.backend = backend
        self.layout = layout = native_layout(call.layout_in, backend.layouts)
        self.view_q = view_q = input_view(call.layout_in, layout, call.heads_q, backend.contiguous)
        self.view_kv = view_kv = input_view(call.layout_in, layout, call.heads_kv, backend.contiguous)
        view_out = output_view(layout, call.layout_out)
        self.adapt_mask = adapt_mask = mask_adapter(call.mask_kind, len(call.mask_shape or ()), call.dtype)
        kernel = backend.kernel_for(call, rest)
        if backend.configure is not None:
            kernel = backend.configure(kernel, backend.default_settings if settings is None else settings, call)

        if adapt_mask is None:
            def run(q, k, v, mask, scale):
                return view_out(kernel(view_q(q), view_kv(k), view_kv(v), None, scale, layout))
        else:
            def run(q, k, v, mask, scale):
                return view_out(kernel(view_q(q), view_kv(k), view_kv(v), adapt_mask(mask), scale, layout))
        self.run = run

    def runtime_reasons(self, tensors: Tensors) -> list[str]:
        """The backend's own check on the real tensors, in its layout (e.g. PyTorch's
        `can_use_*` for a forced SDPA kernel)."""
        check = self.backend.runtime_check
        if check is None:
            return []
        q, k, v, mask, _ = tensors
        return check(self.view_q(q), self.view_kv(k), self.view_kv(v),
                     None if self.adapt_mask is None else self.adapt_mask(mask))


class Plan:
    """The decision for one call signature, and the prepared function that carries it out."""

    __slots__ = ("backend", "name", "signature", "rejected", "run", "counter", "failed_calls", "refused", "error",
                 "tuning", "tuned_by", "retry", "mask_service", "masked_call", "settings")

    def __init__(self, backend: Optional[Backend], signature: CallSignature, rejected: tuple[Rejection, ...],
                 run: Optional[Callable], error: Optional[NoBackendError] = None,
                 tuning: Optional[Decision] = None, passthrough: str = PASSTHROUGH, settings: Any = None,
                 tuned_by: Optional[str] = None) -> None:
        self.backend = backend
        self.name = backend.name if backend is not None else passthrough
        self.signature = signature
        self.rejected = rejected
        self.run = run
        self.counter = itertools.count()
        self.failed_calls = 0  # counted calls served again by another plan (kernel raised, or demoted)
        self.refused = 0  # calls that raised instead of being served (strict, or no fallback)
        self.error = error
        self.tuning = tuning  # the tuner's decision, when a measurement chose this plan
        self.tuned_by = tuned_by  # which strategy measured: registry.AUTO_TUNED, or AUTO (a contested call)
        # Made while a kernel's failure kept it off this signature: plan again next run.
        self.retry = any(r.kind == FAILED for r in rejected)
        # Masked calls: how the mask was served (mask_serving.SERVICES) and the call as
        # made, when `signature` is the mask-less call the backend was chosen for.
        self.mask_service: Optional[str] = None
        self.masked_call: Optional[CallSignature] = None
        self.settings = settings  # what a configurable (sparse) backend runs with

    @property
    def calls(self) -> int:
        """Calls this plan served (or, with no run, refused or passed on)."""
        return count_value(self.counter) - self.failed_calls - self.refused

    def reset(self) -> None:
        self.counter = itertools.count()
        self.failed_calls = 0
        self.refused = 0

    @property
    def is_fallback(self) -> bool:
        return any(r.is_fallback_cause for r in self.rejected)

    def fallback_reasons(self) -> list[tuple[str, str]]:
        """(backend passed over, reason) for each cause of this plan being a fallback."""
        return [(r.backend, "; ".join(r.reasons)) for r in self.rejected if r.is_fallback_cause]

    def __repr__(self) -> str:
        return f"Plan({self.name}, {self.signature.describe()}, calls={self.calls})"


class PlanMonitor(Protocol):
    """Told of every plan a dispatcher makes with tensors (attention.quality.QualityMonitor)."""

    def watch(self, dispatcher: "Dispatcher", plan: Plan, tensors: Tensors) -> None: ...


class Dispatcher:
    """Serves attention calls from a priority list, deciding once per call signature.

    priority: backend names and strategies, best first, as text ('flash4 > auto'), names
        or a parsed Priority; `auto` expands to the device's auto order.
    strict: no passthrough to the caller's fallback, and a kernel error raises
        (with every candidate's reasons) instead of moving to the next backend.
    tuner: decides `auto_tuned` positions; one is made (default file) when the
        priority names `auto_tuned` and none is given.
    passthrough: the name that calls served by the caller's fallback count under
        (the previous override's name when the caller chains one).
    cost_model: orders `auto` by predicted time (cost_model.py). None: this machine's
        calibration or the model shipped for the GPU class (cost_store.py), unless an
        auto table is given or set by ATTENTION_BACKENDS_AUTO, which then decides.
    mask_cache: where mask classifications live for a model call (masks.py); the node
        shares one between its dispatchers and clears it at every model call.
    settings: per backend name, the settings object of a backend that takes one (the
        sparse backends); a backend named without settings runs with its defaults.
    monitor: watches the plans as they are made (the sparse node's quality monitor).
    measurer: times the kernels `auto`'s cost model cannot separate on a call
        (cost_model.contested); one is made (auto_measured.json beside the default
        tuning file) when the priority names `auto`, a cost model decides, none is given,
        `measure_contested` is true and ATTENTION_BACKENDS_AUTO_MEASURE is not 0.
    """

    def __init__(self, priority: str | Sequence[str] | Priority = registry.AUTO, *, strict: bool = False,
                 auto_table: Optional[dict[str, tuple[AutoEntry, ...]]] = None,
                 tuner: Optional[Tuner] = None, cost_model: Optional[CostModel] = None,
                 passthrough: str = PASSTHROUGH, mask_cache: Optional[MaskCache] = None,
                 settings: Optional[Mapping[str, Any]] = None, monitor: Optional[PlanMonitor] = None,
                 measurer: Optional[Tuner] = None, measure_contested: bool = True) -> None:
        self.priority: Priority = parse_priority(priority)
        self.strict = strict
        self.settings = _checked_settings(settings or {})
        self.monitor = monitor
        # (backend name, signature) -> why the monitor took it off this signature.
        self._demoted: dict[tuple[str, CallSignature], str] = {}
        self.passthrough = passthrough
        self._cost_model = cost_model
        self._table_decides = auto_table is not None or bool(os.environ.get(ENV_TABLE))
        self._auto_table = auto_table if auto_table is not None else load_table()
        if tuner is None and self.priority.uses_tuner:
            tuner = Tuner()
        self.tuner = tuner
        if (measurer is None and measure_contested and self.priority.uses_auto and not self._table_decides
                and auto_measures()):
            measurer = Tuner(auto_measured_path())
        self.measurer = measurer if measure_contested else None
        self.masks = mask_cache if mask_cache is not None else MaskCache()
        self._plans: dict[tuple, Plan] = {}
        self._prepared: dict[tuple[str, CallSignature, Priority], Prepared] = {}
        self._retired: list[Plan] = []  # plans replaced or evicted this run, kept for the counters
        self._planning = threading.Lock()
        # The handle a compiled graph calls this dispatcher by (standalone use; ComfyUI's
        # override registers its own target).
        self.handle = register_target(self)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 mask: Optional[torch.Tensor] = None, *, skip_reshape: bool = False,
                 skip_output_reshape: bool = False, scale: Optional[float] = None,
                 attn_precision: Optional[torch.dtype] = None, low_precision: bool = True,
                 fallback: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """Attention for one call in ComfyUI's form (see attention.call).

        `fallback` serves calls no candidate can (ComfyUI's own function, from the
        override); without one such a call raises NoBackendError. Under torch.compile
        the call is recorded as one opaque op that comes back here when the graph runs
        (without `fallback`: a compiled standalone call no backend serves raises).
        """
        if is_compiling():
            return compiled_attention(self.handle, q, k, v, heads, mask, skip_reshape=skip_reshape,
                                      skip_output_reshape=skip_output_reshape, scale=scale,
                                      attn_precision=attn_precision, low_precision=low_precision)
        out = self.serve(q, k, v, heads, mask, skip_reshape, skip_output_reshape, scale, attn_precision,
                         low_precision, fallback is not None)
        return fallback() if out is None else out

    def serve(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Optional[torch.Tensor],
              skip_reshape: bool, skip_output_reshape: bool, scale: Optional[float],
              attn_precision: Optional[torch.dtype], low_precision: bool,
              may_pass: bool) -> Optional[torch.Tensor]:
        """An eager call, every argument positional: the hot path of ComfyUI's override,
        which has checked it is not tracing. None when no backend serves the call and
        `may_pass` (the caller then passes it on to its own function: no fallback closure is
        made per call); with `may_pass` false such a call raises. What this path costs a call,
        kernel stubbed out: benchmarks/override_path.py (results in
        benchmarks/results/cpu/override_path/), against SDXL's shortest calls on the GPU:
        benchmarks/results/h200/overhead_2026-12-02/."""
        mask_class = None
        if mask is not None:
            if skip_reshape:
                mask_class = self.masks.classify(mask, q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            else:
                mask_class = self.masks.classify(mask, q.shape[0], heads, q.shape[1], k.shape[1])
        # get_device(): the device's index as an int (-1 on the CPU), quicker to read and to
        # hash than q.device (benchmarks/override_path.py); a dispatcher serves one device type.
        key = (q.shape, k.shape, v.shape, q.dtype, q.get_device(), heads, skip_reshape, skip_output_reshape,
               None if mask is None else (mask.dtype, mask.shape, mask_class), attn_precision, low_precision,
               scale is None)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(key, q, k, v, heads, mask, mask_class, skip_reshape, skip_output_reshape, scale,
                              attn_precision, low_precision)
        next(plan.counter)
        if plan.run is None:
            if not may_pass or self.strict:
                plan.refused += 1
                raise plan.error
            return None
        try:
            return plan.run(q, k, v, mask, scale)
        except Exception as error:
            self._record_failure(key, plan, error)
            return self.serve(q, k, v, heads, mask, skip_reshape, skip_output_reshape, scale, attn_precision,
                              low_precision, may_pass)

    def serve_compiled(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                       heads: int, *, skip_reshape: bool, skip_output_reshape: bool, scale: Optional[float],
                       attn_precision: Optional[torch.dtype], low_precision: bool, enable_gqa: bool, where: str,
                       func: str) -> torch.Tensor:
        """A call from a compiled graph (compiled.py), served as an eager call."""
        return self(q, k, v, heads, mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                    scale=scale, attn_precision=attn_precision, low_precision=low_precision)

    def candidates(self, call: CallSignature) -> list[Candidate | TunedStrategy | Contest]:
        """The priority list for this call, strategies expanded, duplicates dropped.
        `auto` becomes the auto order, with a Contest before the first kernel its cost model
        cannot separate (when this dispatcher has a measurer); `auto_tuned` stays as itself
        (decided with the tensors), followed by the auto order for calls the tuner leaves
        undecided (no Contest there: auto_tuned's budget, once spent, means no timing)."""
        auto_entries = self.auto_entries(call) if self.priority.uses_auto_order else ()
        auto_order = [Candidate(e.backend, e.rule, False) for e in auto_entries]
        contested = tuple(e.backend for e in auto_entries if e.measure) if self.measurer is not None else ()
        seen: set[str] = set()
        result: list[Candidate | TunedStrategy | Contest] = []
        for entry in self.priority:
            if isinstance(entry, NamedBackend):
                expanded: list[Candidate | TunedStrategy | Contest] = [Candidate(entry.name, _ALWAYS, True)]
            elif isinstance(entry, TunedStrategy):
                expanded = [entry, *auto_order]
            else:
                expanded = list(auto_order)
                if contested:
                    first = next(i for i, e in enumerate(auto_entries) if e.measure)
                    keep = next((e.backend for e in auto_entries if e.measure and e.rule.reason(call) is None), None)
                    expanded.insert(first, Contest(contested, keep))
            for candidate in expanded:
                if isinstance(candidate, Contest):
                    if candidate not in result:
                        result.append(candidate)
                elif candidate.name not in seen:
                    seen.add(candidate.name)
                    result.append(candidate)
        return result

    def prepared(self, backend: Backend, call: CallSignature, rest: Priority = NOTHING_AFTER) -> Prepared:
        """`backend` ready for `call`, made once per dispatcher (`rest`: the priority after it)."""
        key = (backend.name, call, rest)
        ready = self._prepared.get(key)
        if ready is None:
            if len(self._prepared) >= 4 * MAX_PLANS:
                self._prepared.clear()
            ready = self._prepared[key] = Prepared(backend, call, self.settings.get(backend.name), rest)
        return ready

    def _after(self, name: str) -> Priority:
        """The priority after the named backend `name`, for a backend that binds to it
        (nothing for the others, and when a strategy brought it in)."""
        if registry.get(name).bind is None:
            return NOTHING_AFTER
        return self.priority.after(name)

    def auto_entries(self, call: CallSignature) -> tuple[AutoEntry, ...]:
        """`auto`'s order for this call: a saved auto_tuned decision first, then by the cost
        model, or by the rule table (cost_store.py says which applies)."""
        model, saved = self._cost_model, None
        if not self._table_decides:
            saved = cost_store.saved_choice(call)
            if model is None:
                model = cost_store.model_for(call.device_type, call.compute_capability)
        return auto_entries_for(call, self._auto_table, model, saved)

    def plan_for(self, call: CallSignature, tensors: Optional[Tensors] = None) -> Plan:
        """Decide for `call`. Without `tensors` (a synthetic call) runtime checks are
        skipped, `auto_tuned` measures nothing (its static order answers), a contested
        call is answered by this machine's saved measurement when there is one, and the
        plan cannot run, but says what would be chosen and why."""
        rejected: list[Rejection] = []
        # Each prepared backend's runtime check on these tensors, asked once: the tuner's
        # eligibility and the walk down the list may both need it.
        checked: dict[Prepared, list[str]] = {}
        for candidate in self.candidates(call):
            if isinstance(candidate, TunedStrategy):
                tuned = (self._tuned_plan(call, tensors, rejected, checked)
                         if tensors is not None and self.tuner else None)
                if tuned is not None:
                    return tuned
                continue
            if isinstance(candidate, Contest):
                if self.measurer is None:
                    continue
                measured = (self._measured_plan(call, candidate, tensors, rejected, checked)
                            if tensors is not None else self._saved_plan(call, candidate, rejected))
                if measured is not None:
                    return measured
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
            failure = _blocking_failure(candidate.name, call)
            if failure is not None:
                rejected.append(Rejection(candidate.name, tuple(reasons) + (failure.reason,), FAILED,
                                          candidate.explicit))
                continue
            demoted = self._demoted.get((candidate.name, call))
            if demoted is not None:
                rejected.append(Rejection(candidate.name, (demoted,), QUALITY, candidate.explicit))
                continue
            prepared = (self.prepared(backend, call, self._after(candidate.name))
                        if not reasons and tensors is not None else None)
            if prepared is not None:
                reasons = _runtime_reasons(prepared, tensors, checked)
            if reasons:
                rejected.append(Rejection(candidate.name, tuple(reasons), UNSUPPORTED, candidate.explicit))
                continue
            return Plan(backend, call, tuple(rejected), None if prepared is None else prepared.run,
                        passthrough=self.passthrough, settings=self.settings.get(candidate.name,
                                                                                 backend.default_settings))
        error = NoBackendError(call, tuple(rejected), self.strict)
        return Plan(None, call, tuple(rejected), None, error, passthrough=self.passthrough)

    def runs_traced_sdpa(self, call: CallSignature) -> bool:
        """Whether a compiled graph may run `call` as PyTorch's SDPA traced into the graph
        (nodes/compiled.py): this dispatcher's plan for it is plain `sdpa`, which needs no
        look at the tensors, is no fallback from a kernel that failed this run (that
        kernel is retried next run, which a graph cannot do), and is not a contested call
        that `auto` still has to decide by timing on the tensors: one this machine has
        measured already (the decision saved, SDPA chosen) is traced like any other."""
        plan = self.plan_for(call)
        if plan.tuned_by != registry.AUTO and any(isinstance(c, Contest) for c in self.candidates(call)):
            return False
        return (plan.backend is not None and plan.name == TRACED_BACKEND and plan.backend.runtime_check is None
                and not plan.retry)

    def current_plan(self, key: tuple) -> Optional[Plan]:
        """The plan cached under `key` now, if any."""
        return self._plans.get(key)

    def traced_plan(self, key: tuple, call: CallSignature) -> Plan:
        """The plan that counts the calls a compiled graph ran as traced SDPA: the plan an
        eager call of `call` finds or makes under the same key."""
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        with self._planning:
            plan = self._plans.get(key)
            if plan is None:
                plan = self.plan_for(call)
                if plan.backend is not None:
                    plan.run = self.prepared(plan.backend, call).run
                if plan.tuned_by == registry.AUTO and plan.tuning is not None:
                    self.measurer.reused(plan.tuning)
                if len(self._plans) >= MAX_PLANS:
                    self._evict()
                self._plans[key] = plan
            return plan

    def eligible(self, call: CallSignature, tensors: Tensors,
                 checked: Optional[dict[Prepared, list[str]]] = None,
                 only: Optional[frozenset[str]] = None) -> dict[str, Callable]:
        """Every tunable backend (of `only`, when given) that can serve this call here,
        prepared to run it (`checked`: runtime checks already made on `tensors`, added to)."""
        checked = {} if checked is None else checked
        runs = {}
        for backend in registry.all_backends():
            if only is not None and backend.name not in only:
                continue
            if not backend.tunable or not backend.availability().available or backend.call_reasons(call):
                continue
            if _blocking_failure(backend.name, call) is not None:
                continue
            prepared = self.prepared(backend, call)
            if not _runtime_reasons(prepared, tensors, checked):
                runs[backend.name] = prepared.run
        return runs

    def _tuned_plan(self, call: CallSignature, tensors: Tensors, rejected: list[Rejection],
                    checked: dict[Prepared, list[str]]) -> Optional[Plan]:
        """auto_tuned: every eligible backend timed, the static auto order measured first."""
        runs = self.eligible(call, tensors, checked)
        static = [e.backend for e in self.auto_entries(call) if e.rule.reason(call) is None]
        return self._chosen_plan(self.tuner, registry.AUTO_TUNED, call, tensors, runs, static, rejected)

    def _measured_plan(self, call: CallSignature, contest: Contest, tensors: Tensors,
                       rejected: list[Rejection], checked: dict[Prepared, list[str]]) -> Optional[Plan]:
        """The contested kernels and SDPA timed through the measurer (a saved measurement
        of this machine is reused), the contest's decision planned."""
        runs = self.eligible(call, tensors, checked, only=frozenset((*contest.names, SAFEST)))
        if len(runs) < 2:
            return None
        return self._chosen_plan(self.measurer, registry.AUTO, call, tensors, runs, contest.names, rejected,
                                 keep=contest.keep)

    def _saved_plan(self, call: CallSignature, contest: Contest, rejected: list[Rejection]) -> Optional[Plan]:
        """Without tensors: the contest's saved decision on this machine, planned when its
        kernel can serve the call as far as the call alone tells (None otherwise: the walk
        goes on down the model's order, and the call is timed when it runs)."""
        device = _signature_device(call)
        decision = None if device is None else self.measurer.saved(call, device)
        if decision is None or decision.backend not in (*contest.names, SAFEST):
            return None
        backend = registry.get(decision.backend)
        if (not backend.availability().available or backend.call_reasons(call)
                or _blocking_failure(backend.name, call) is not None or (backend.name, call) in self._demoted):
            return None
        return Plan(backend, call, tuple(rejected), None, tuning=decision, passthrough=self.passthrough,
                    tuned_by=registry.AUTO)

    def _chosen_plan(self, tuner: Tuner, strategy: str, call: CallSignature, tensors: Tensors,
                     runs: dict[str, Callable], prefer: Sequence[str], rejected: list[Rejection],
                     keep: Optional[str] = None) -> Optional[Plan]:
        """The plan of `tuner`'s decision among `runs` (None when it makes none), marked as
        measured by `strategy`."""
        decision = tuner.choose(call, tensors, runs, prefer=prefer, keep=keep) if runs else None
        if decision is None:
            return None
        return Plan(registry.get(decision.backend), call, tuple(rejected), runs[decision.backend], tuning=decision,
                    passthrough=self.passthrough, tuned_by=strategy)

    def plans(self) -> list[Plan]:
        """Every plan of this run (including ones replaced after a failure or evicted)."""
        return self._retired + list(self._plans.values())

    def counters(self) -> UsageCounters:
        """Calls served per backend and fallbacks by reason, since the last reset."""
        return summarize(self.plans())

    def begin_run(self) -> None:
        """Zero the counters for a new run; signatures that fell back because a kernel
        failed earlier are planned again (that kernel is retried)."""
        _new_generation()
        self.masks.reset_count()
        with self._planning:
            self._retired.clear()
            for key in [key for key, plan in self._plans.items() if plan.retry]:
                del self._plans[key]
            for plan in self._plans.values():
                plan.reset()

    reset_counters = begin_run

    def clear(self) -> None:
        """Forget every decision (the next call of each signature plans again), and
        every demotion."""
        with self._planning:
            self._plans.clear()
            self._prepared.clear()
            self._retired.clear()
            self._demoted.clear()

    def demote(self, plan: Plan, reason: str, tensors: Tensors) -> Plan:
        """Take `plan`'s backend off its signature (a monitor found its error over
        budget): plan the signature again on `tensors` without it, and count the call in
        flight, which the replacement now serves, for the replacement. The old plan is
        kept for the counters of the calls it served."""
        with self._planning:
            key = next((key for key, current in self._plans.items() if current is plan), None)
            if key is None:
                raise ValueError(f"{plan!r} is not a current plan of this dispatcher")
            self._demoted[(plan.name, plan.signature)] = reason
            replacement = self.plan_for(plan.signature, tensors)
            plan.failed_calls += 1
            next(replacement.counter)
            self._retired.append(plan)
            self._plans[key] = replacement
        return replacement

    def _plan(self, key: tuple, q, k, v, heads, mask, mask_class, skip_reshape, skip_output_reshape, scale,
              attn_precision, low_precision) -> Plan:
        with self._planning:
            plan = self._plans.get(key)  # another thread may have planned it meanwhile
            if plan is not None:
                return plan
            call = describe_call(q, k, v, heads, mask, skip_reshape=skip_reshape,
                                 skip_output_reshape=skip_output_reshape, attn_precision=attn_precision,
                                 low_precision_ok=low_precision, custom_scale=scale is not None)
            plan = None
            if mask_class is not None and mask_class.kind != GENERAL:
                plan = self._plan_without_mask(call, mask_class, (q, k, v, mask, scale))
            if plan is None:
                plan = self.plan_for(call, (q, k, v, mask, scale))
                if mask is not None:
                    plan.mask_service = KEPT
            if self.monitor is not None and plan.run is not None:
                self.monitor.watch(self, plan, (q, k, v, mask, scale))
            if plan.is_fallback:
                causes = "; ".join(f"{name}: {why}" for name, why in plan.fallback_reasons())
                if plan.run is not None:
                    served = f"served by {plan.name}"
                elif self.strict:
                    served = "refused (strict)"
                else:
                    served = f"passed on to {plan.name}"
                log.info("attention backends: %s %s (%s)", call.describe(), served, causes)
            if len(self._plans) >= MAX_PLANS:
                self._evict()
            self._plans[key] = plan
            return plan

    def _plan_without_mask(self, call: CallSignature, mask_class: MaskClass, tensors: Tensors) -> Optional[Plan]:
        """A plan serving a no-op or key-padding mask on the mask-less call it equals
        (mask_serving.py); None where the mask had better stay."""
        q, k, v, _, scale = tensors
        plan = self.plan_for(served_signature(call, mask_class), served_tensors(call, mask_class, q, k, v)
                             + (None, scale))
        if plan.run is None or plan.backend.sparse:
            # A sparse kernel never serves a masked call, even one whose mask is a no-op:
            # its quality protections assume the calls the user pointed it at.
            return None
        chosen = serving_run(mask_class, call, plan.backend, plan.run, q.device)
        if chosen is None:
            return None
        plan.mask_service, plan.run = chosen
        plan.masked_call = call
        return plan

    def _evict(self) -> None:
        """Drop the oldest plan (dicts keep insertion order); a plan that served calls
        this run stays counted until the run ends."""
        key, oldest = next(iter(self._plans.items()))
        del self._plans[key]
        if oldest.calls:
            self._retired.append(oldest)

    def _record_failure(self, key: tuple, plan: Plan, error: Exception) -> None:
        reason = "raised " + describe_exception(error)
        with _failures_lock:
            earlier = _failures.get((plan.name, plan.signature))
            count = 1 if earlier is None else earlier.count + 1
            _failures[(plan.name, plan.signature)] = Failure(reason, count, _current_generation)
        if self.strict:
            plan.refused += 1
            rejected = plan.rejected + (Rejection(plan.name, (reason,), FAILED, True),)
            raise NoBackendError(plan.signature, rejected, True) from error
        plan.failed_calls += 1
        if earlier is None or count == RETRY_LIMIT:
            log.warning("attention backends: %s %s on %s; using the next backend for such calls %s",
                        plan.name, reason, plan.signature.describe(),
                        "for the rest of this run" if count < RETRY_LIMIT
                        else f"until the failures are cleared ({count} failures)")
        with self._planning:
            if self._plans.get(key) is plan:
                self._retired.append(self._plans.pop(key))


def _runtime_reasons(prepared: Prepared, tensors: Tensors, checked: dict[Prepared, list[str]]) -> list[str]:
    """`prepared`'s runtime check on `tensors`, made once per planning (`checked` keeps it)."""
    reasons = checked.get(prepared)
    if reasons is None:
        reasons = checked[prepared] = prepared.runtime_reasons(tensors)
    return reasons


def _checked_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings by backend name, each for a backend that takes settings of its type,
    each without problems (ValueError naming them otherwise)."""
    for name, value in settings.items():
        backend = registry.get(name)
        if backend.configure is None:
            raise ValueError(f"backend {name!r} takes no settings")
        if not isinstance(value, type(backend.default_settings)):
            raise ValueError(f"settings for {name!r} must be {type(backend.default_settings).__name__}, "
                             f"not {type(value).__name__}")
        problems = value.problems()
        if problems:
            raise ValueError(f"settings for {name!r}: " + "; ".join(problems))
    return dict(settings)


__all__ = ["Dispatcher", "Plan", "Prepared", "Candidate", "Contest", "Failure", "failure_rows", "PlanMonitor",
           "PASSTHROUGH", "RETRY_LIMIT", "MAX_PLANS", "forget_failures", "remembered_failures", "NoBackendError",
           "UNSUPPORTED", "UNAVAILABLE", "RULE", "FAILED", "QUALITY"]
