"""Run reports: one per sampler run of a patched MODEL (docs/api.md).

The run boundary is an OUTER_SAMPLE wrapper: it runs inside the sampler's try/finally,
so counters are zeroed when sampling starts and the report is built, logged, pushed to
the browser and kept for `GET /attention_backends/report` however the run ends. The
wrapper never raises on its own account: a failure of the report is logged, and an
error of the run (a call refused in stop mode) passes through untouched, so the
cleanup of every wrapper and pack around it still runs.

A report is filed under the Attention Backend node the sampler ran through
(executing.py), and says where calls went that this node did not serve: passed on to
the override installed before it (named), refused in stop mode, or bypassed by a
layer whose forward a pack replaced (coverage.py).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Callable, Optional

import torch

from ..attention import PASSTHROUGH
from ..attention.contract import decision_json, signature_fields
from ..attention.registry import AUTO, AUTO_TUNED
from ..attention.tuning import Tuner
from .compat import OVERRIDE_KEY, prompt_server
from .coverage import BypassProbe, Coverage, ReplacedLayers, function_label, function_origin, run_coverage
from .executing import report_node
from .compiled import begin_compiled_run, end_compiled_run
from .state import PatchState

log = logging.getLogger(__name__)

REPORT_EVENT = "attention_backends.report"

# The last report of every node, by node id (as the prompt spells it).
_last_reports: dict[str, dict] = {}

_NEVER_INVOKED = "The override was never invoked during this run: "
_REPLACED = ("a node after this one replaced the attention override (another attention node such as core's "
             "ModelAttentionBackend, or a pack writing optimized_attention_override); put this node last "
             "in the MODEL chain.")
_BYPASSED = ("this model's attention does not go through ComfyUI's override (HunyuanDiT, PixArt, Hunyuan3D 2.1, "
             "SD3 auxiliary paths, Mochi's attention pool and Wan Animate's face adapter bypass it, as do packs "
             "that replace the model's forward, such as TeaCache-style caches); nothing was changed.")
_NO_ATTENTION = ("No layer of this model calls ComfyUI's attention functions (it has no attention, or computes it "
                 "without them), so this node had nothing to serve and changed nothing.")


def last_reports() -> dict[str, dict]:
    """A copy of the last report of every node."""
    return dict(_last_reports)


def passthrough_name(previous: Any) -> str:
    """What calls passed on are reported as: the override installed before ours, by its
    qualified name and the pack (or module) it comes from, or ComfyUI's own function."""
    if previous is None:
        return PASSTHROUGH
    return f"{function_label(previous)} ({function_origin(previous)})"


def run_wrapper(state: PatchState) -> Callable:
    """OUTER_SAMPLE wrapper: the run boundary of one patched MODEL."""

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        state.begin_run()
        guider = getattr(executor, "class_obj", None)
        model_options = getattr(guider, "model_options", {})
        installed = model_options.get("transformer_options", {}).get(OVERRIDE_KEY) is state.override
        begin_compiled_run(state, model_options, installed)
        probe = _start_probe(state, guider)
        try:
            return executor(*args, **kwargs)
        finally:
            end_compiled_run(state)
            _finish(state, guider, probe)

    return wrapper


def _diffusion_model(guider: Any) -> Any:
    return getattr(getattr(getattr(guider, "model_patcher", None), "model", None), "diffusion_model", None)


def _start_probe(state: PatchState, guider: Any) -> Optional[BypassProbe]:
    # Before the run: a failure here costs the report its coverage, never the run.
    diffusion_model = _diffusion_model(guider)
    if not isinstance(diffusion_model, torch.nn.Module):
        return None
    try:
        return BypassProbe(diffusion_model, lambda: _received(state))
    except Exception:
        log.exception("attention backends: could not read the model's attention layers")
        return None


def _run_coverage(probe: Optional[BypassProbe], guider: Any) -> Optional[Coverage]:
    # Evidence for the warnings: without it the report still comes, with coverage unknown.
    try:
        return run_coverage(probe, _diffusion_model(guider))
    except Exception:
        log.exception("attention backends: could not read which attention layers the run reached")
        return None


def _received(state: PatchState) -> int:
    """Calls the override has had this run (served, passed on, refused, or of unknown form)."""
    return state.count("unknown_form") + sum(plan.calls + plan.refused for _, dispatcher in state.dispatchers()
                                             for plan in dispatcher.plans())


def _finish(state: PatchState, guider: Any, probe: Optional[BypassProbe]) -> None:
    # Runs in the sampler's finally: a failure here must not hide the run's own outcome.
    try:
        if probe is not None:
            probe.remove()
        options = getattr(guider, "model_options", {}).get("transformer_options", {})
        model = getattr(getattr(guider, "model_patcher", None), "model", None)
        # The group's summary, then its cached memory on the other GPUs handed back.
        head_parallel = state.head_group.end_run() if state.head_group is not None else None
        report = build_report(state, still_installed=options.get(OVERRIDE_KEY) is state.override,
                              model_name=_model_name(model), coverage=_run_coverage(probe, guider),
                              filed_under=report_node(state), head_parallel=head_parallel)
        publish(state, report)
    except Exception:
        log.exception("attention backends: could not build the run report")
    # The measured decisions of this run: written once, here, never inside sampling.
    for tuner in state.tuners():
        try:
            tuner.flush()
        except Exception:
            log.exception("attention backends: could not save the tuning decisions")


def _measured_line(tuning: dict, what: str, left_to: str) -> str:
    """The log line's words for auto_tuned's `tuning`, or `auto`'s measured contested calls."""
    noun = "contested signatures" if tuning.get("strategy") == AUTO else "signatures"
    return (f"{what} {tuning['measured']} {noun} measured in {tuning['tuning_s']:.2f}s, "
            f"{tuning['reused']} reused from {tuning['file']}"
            + (f", {tuning['kept']} kept from this node's earlier run" if tuning.get("kept") else "")
            + (f", {len(tuning['left_to_auto'])} left to {left_to} (run budget spent)"
               if tuning["left_to_auto"] else ""))


def _model_name(model: Any) -> str:
    config = getattr(model, "model_config", None)
    return type(config).__name__ if config is not None else type(model).__name__


def build_report(state: PatchState, *, still_installed: bool, model_name: str,
                 coverage: Optional[Coverage] = None, filed_under: Optional[dict] = None,
                 head_parallel: Optional[dict] = None) -> dict:
    """The report of the run that just ended, from the dispatchers' counters and plans.

    coverage: the model's attention layers and replaced forwards (None: not known).
    filed_under: node_id, sampler_node_id and prompt_id (report_node); None: the state's node.
    head_parallel: head_parallel's group summary, when the selection names it.
    """
    served: Counter[str] = Counter()
    fallbacks: Counter[tuple[str, str, str]] = Counter()
    masked: dict[str, Counter[str]] = {}
    plans = []
    refused = 0
    for route, dispatcher in state.dispatchers():
        counters = dispatcher.counters()
        served.update(counters.served)
        refused += counters.refused
        for backend, services in counters.masked.items():
            masked.setdefault(backend, Counter()).update(services)
        for fallback in counters.fallbacks:
            fallbacks[(fallback.wanted, fallback.served_by, fallback.reason)] += fallback.calls
        plans.extend(_plan_row(route, plan) for plan in dispatcher.plans() if plan.calls or plan.refused)
    total = sum(served.values())
    received = total + state.count("unknown_form") + refused
    filed_under = filed_under or {"node_id": state.node_id, "sampler_node_id": None, "prompt_id": None}
    passed_on_to = state.main.passthrough
    return {
        "node_id": filed_under["node_id"],
        "sampler_node_id": filed_under["sampler_node_id"],
        "prompt_id": filed_under["prompt_id"],
        "node_type": state.node_type,
        "selection": state.selection,
        "strict": state.strict,
        "model": model_name,
        "started_at": state.started_at,
        "duration_s": round(time.time() - state.started_at, 3),
        "total_calls": total,
        "model_attention_calls": received,
        "refused_calls": refused,
        "passed_on_to": None if passed_on_to == PASSTHROUGH else passed_on_to,
        "attention_layers": None if coverage is None else coverage.layers,
        "bypassed": [] if coverage is None else [group.to_json() for group in coverage.bypassing()],
        "served": dict(served.most_common()),
        "shares": {name: round(calls / received, 4) for name, calls in served.most_common()},
        "fallbacks": [{"wanted": wanted, "served_by": served_by, "reason": reason, "calls": calls}
                      for (wanted, served_by, reason), calls in fallbacks.most_common()],
        "masked": {backend: dict(services.most_common()) for backend, services in masked.items()},
        "masks_read": state.main.masks.classifications,
        "routing": {"exact_by_step_window": state.count("routed_step"),
                    "exact_by_block_filter": state.count("routed_block"),
                    "exact_by_cross_rule": state.count("routed_cross")},
        "guard": {"nonfinite_model_calls": state.count("nonfinite_model_calls"), "reruns": state.count("reruns"),
                  "pinned_exact": state.pinned},
        # Under compile a call outside ComfyUI's form is traced into the graph as it is,
        # uncounted: the report says so rather than give 0.
        "compiled": {"model_compiled": state.compiled, "calls_through_graph": state.count("compiled_calls"),
                     "calls_traced_as_sdpa": state.count("traced_calls"),
                     "recompiled_stale_graphs": state.recompiled_stale,
                     "unknown_form_calls_counted": not state.compiled},
        "plans": sorted(plans, key=lambda row: -row["calls"]),
        "tuning": _tuning(state),
        "auto_measured": _auto_measured(state),
        "quality": state.monitor.summary() if state.monitor is not None else None,
        "head_parallel": head_parallel,
        "warnings": _warnings(state, received, still_installed, coverage, served, refused),
    }


def _tuning(state: PatchState) -> Optional[dict]:
    """auto_tuned's part of the run, or None when the node does not use it."""
    return _measured(state.tuner, state, AUTO_TUNED)


def _auto_measured(state: PatchState) -> Optional[dict]:
    """The contested calls `auto` timed or reused a measurement for in this run, or None
    when there were none (most runs: image models' calls are never contested)."""
    summary = _measured(state.measurer, state, AUTO)
    return summary if summary is not None and summary["decisions"] else None


def _measured(tuner: Optional[Tuner], state: PatchState, strategy: str) -> Optional[dict]:
    if tuner is None:
        return None
    summary = tuner.summary(p.tuning for _, d in state.dispatchers() for p in d.plans()
                            if p.calls and p.tuning is not None and p.tuned_by == strategy)
    return {**summary, "strategy": strategy, "decisions": [decision_json(d) for d in summary["decisions"]]}


def _plan_row(route: str, plan: Any) -> dict:
    return {"signature": plan.signature.describe(), "shape": signature_fields(plan.signature),
            "backend": plan.name, "calls": plan.calls,
            "refused": plan.refused, "route": route,
            "passed_over": [{"backend": r.backend, "kind": r.kind, "reasons": list(r.reasons)}
                            for r in plan.rejected],
            "tuned": None if plan.tuning is None else plan.tuning.source, "tuned_by": plan.tuned_by,
            "mask": plan.mask_service,
            "masked_call": None if plan.masked_call is None else plan.masked_call.describe(),
            "settings": None if plan.settings is None else plan.settings.describe()}


def _layers(group: ReplacedLayers, coverage: Coverage) -> str:
    return (f"{len(group.names)} of the model's {coverage.layers} attention layers (e.g. '{group.names[0]}'), whose "
            f"forward {group.replacement} ({group.origin}) replaced for this run")


def _coverage_warnings(received: int, still_installed: bool, coverage: Optional[Coverage]) -> list[str]:
    if received == 0:
        if not still_installed:
            return [_NEVER_INVOKED + _REPLACED]
        if coverage is not None and coverage.layers == 0:
            return [_NO_ATTENTION]
        if coverage is not None and coverage.replaced:
            return [_NEVER_INVOKED + "; ".join(_layers(group, coverage) for group in coverage.replaced)
                    + ": that code calls attention without ComfyUI's override, so nothing reached this node."]
        return [_NEVER_INVOKED + _BYPASSED]
    if coverage is None:
        return []
    return [f"{group.bypassed} calls of {_layers(group, coverage)}, did not reach this node: that code calls "
            f"attention without ComfyUI's override, so those calls ran on ComfyUI's own attention."
            for group in coverage.bypassing()]


def _refused_warning(state: PatchState, refused: int) -> str:
    causes = []
    for _, dispatcher in state.dispatchers():
        for plan in dispatcher.plans():
            if not plan.refused:
                continue
            why = "; ".join(f"{r.backend}: {'; '.join(r.reasons)}" for r in plan.rejected)
            if plan.run is not None:
                why = "; ".join(filter(None, (why, f"{plan.name}: its kernel raised")))
            causes.append(f"{plan.signature.describe()} ({why})")
    return (f"{refused} attention calls were refused (on_unsupported = stop) and the run stopped: "
            + "; ".join(causes) + ". Choose 'fall back' to let another backend serve such calls.")


def _warnings(state: PatchState, received: int, still_installed: bool, coverage: Optional[Coverage],
              served: Counter, refused: int) -> list[str]:
    warnings = _coverage_warnings(received, still_installed, coverage)
    if refused:
        warnings.append(_refused_warning(state, refused))
    earlier = state.main.passthrough
    if earlier != PASSTHROUGH and received and not (refused or state.count("unknown_form") or served.get(earlier)):
        warnings.append(f"The attention override installed before this node, {earlier}, was shadowed: this node "
                        f"served every call itself, so that override never ran. If both were meant to work, "
                        f"remove one of the two nodes.")
    if state.count("unknown_form"):
        target = "ComfyUI's own function" if earlier == PASSTHROUGH else earlier
        warnings.append(f"{state.count('unknown_form')} calls were not in ComfyUI's attention form and went to "
                        f"{target} unchanged.")
    if state.count("block_unknown"):
        warnings.append(f"The block filter could not apply to {state.count('block_unknown')} calls: this model "
                        f"(or this "
                        f"ComfyUI version; Flux reports its blocks from ComfyUI 0.8.0) does not say which block "
                        f"an attention call belongs to.")
    if state.count("step_unknown"):
        warnings.append(f"The step window could not apply to {state.count('step_unknown')} model calls: the sampler "
                        f"gave no schedule (sample_sigmas).")
    if state.monitor is not None:
        warnings.extend(state.monitor.warnings())
    if state.count("nonfinite_exact"):
        warnings.append(f"{state.count('nonfinite_exact')} model calls were not finite even with exact attention: "
                        f"the cause is not the attention backend.")
    return warnings


def publish(state: PatchState, report: dict) -> None:
    """Keep the report, log its summary, and push it to the browser when a server runs."""
    state.last_report = report
    if report["node_id"] is not None:
        _last_reports[str(report["node_id"])] = report
    log.info("attention backends: %s", summary(report))
    for warning in report["warnings"]:
        log.warning("attention backends: %s", warning)
    server = prompt_server()
    if server is not None:
        server.send_sync(REPORT_EVENT, report, getattr(server, "client_id", None))


def summary(report: dict) -> str:
    """One line: backend -> calls and share, fallbacks with reasons, routing, guard."""
    who = f"node {report['node_id']}" if report["node_id"] is not None else report["node_type"]
    parts = [f"{who} ({report['selection']}) on {report['model']}: {report['model_attention_calls']} calls"]
    served = ", ".join(f"{name} {calls} ({report['shares'][name]:.0%})" for name, calls in report["served"].items())
    if served:
        parts.append(served)
    if report["refused_calls"]:
        parts.append(f"{report['refused_calls']} refused")
    for fallback in report["fallbacks"]:
        target = "ComfyUI's function" if fallback["served_by"] == PASSTHROUGH else fallback["served_by"]
        parts.append(f"{fallback['calls']} fell back from {fallback['wanted']} to {target}: {fallback['reason']}")
    masked = report.get("masked") or {}
    if masked:
        parts.append("masked calls: " + ", ".join(
            f"{backend} " + " + ".join(f"{calls} {service.replace('_', ' ')}" for service, calls in services.items())
            for backend, services in masked.items()) + f" ({report['masks_read']} masks read)")
    routed = {rule: calls for rule, calls in report["routing"].items() if calls}
    if routed:
        parts.append("routed " + ", ".join(f"{rule} {calls}" for rule, calls in routed.items()))
    for key, what, left_to in (("tuning", "auto_tuned:", "auto"),
                               ("auto_measured", "auto measured", "the model's choice")):
        tuning = report.get(key)
        if tuning:
            parts.append(_measured_line(tuning, what, left_to))
    quality = report.get("quality")
    if quality and quality["signatures"]:
        worst = [row["worst_rel_l1"] for row in quality["signatures"] if row["worst_rel_l1"] is not None]
        over = sum(row["over_budget"] for row in quality["signatures"])
        parts.append(f"quality: {quality['sampled_calls']} sampled calls on {len(quality['signatures'])} signatures"
                     + (f", worst rel. L1 {max(worst):.4f}" if worst else "")
                     + f" (budget {quality['budget_rel_l1']:g})"
                     + (f", {over} over budget and served dense" if over else ""))
    split = report.get("head_parallel")
    if split and (split["split_calls"] or split["local_calls"] or split["busy_calls"]):
        parts.append(_head_parallel_line(split))
    guard = report["guard"]
    if guard["nonfinite_model_calls"]:
        parts.append(f"guard: {guard['nonfinite_model_calls']} non-finite model calls, {guard['reruns']} re-run "
                     f"with exact attention")
    return "; ".join(parts) + f" ({report['duration_s']:.2f}s)"


def _head_parallel_line(split: dict) -> str:
    shares = ", ".join(f"{d['device']} {d['work_share']:.0%}" + (
        f" ({d['transfer_ms_per_call']:.2f} ms/call on links)" if d["transfer_ms_per_call"] is not None else "")
        for d in split["per_device"])
    line = f"head_parallel: {split['split_calls']} calls split"
    if shares:
        line += f" ({shares})"
    line += f", {split['local_calls']} kept on their GPU"
    if split["busy_calls"]:
        line += f", {split['busy_calls']} while another split was in flight"
    if split["dropped"]:
        line += "; dropped: " + ", ".join(f"{device} ({why})" for device, why in split["dropped"].items())
    return line
