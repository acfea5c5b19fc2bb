"""Installing the override into a clone of a MODEL, with its run-boundary and model-call hooks."""

from __future__ import annotations

import uuid
from typing import Any, Optional, Sequence

from ..attention import Dispatcher, Priority, parse_priority
from ..attention.masks import MaskCache
from ..attention.quality import QualityMonitor
from .compat import OVERRIDE_KEY, require_override
from .compiled import compile_watch_wrapper
from .guard import guard_wrapper
from .mask_boundary import mask_boundary_wrapper
from .override import build_override
from .report import passthrough_name, run_wrapper
from .routing import BlockLayout, RoutingRules, build_route, step_window_wrapper
from .state import PatchState
from .tuning import REUSE, make_measurer, make_tuner

FALL_BACK = "fall back"
STOP = "stop"
ON_UNSUPPORTED = (FALL_BACK, STOP)

# Where calls routed to exact attention go: PyTorch's SDPA serves every call form and
# never quantizes. (ComfyUI's own function is not necessarily exact: --use-sage-attention.)
EXACT_PRIORITY = ("sdpa",)


def resolve_priority(priority: Priority | str | Sequence[str], on_unsupported: str) -> tuple[Priority, bool]:
    """(priority, strict) for the user's priority and their choice for unsupported calls.

    "fall back" lets `auto` serve what the named backends cannot, and ComfyUI's function
    (or the previous override) what `auto` cannot; "stop" raises, naming every candidate.
    """
    if on_unsupported not in ON_UNSUPPORTED:
        raise ValueError(f"on_unsupported must be one of {ON_UNSUPPORTED}, not {on_unsupported!r}")
    priority = parse_priority(priority)
    if on_unsupported == STOP:
        return priority, True
    return priority.with_auto_fallback(), False


def patch_model(model: Any, *, priority: Priority | str | Sequence[str], strict: bool, selection: str,
                node_id: Optional[str] = None, node_type: str = "AttentionBackend",
                rules: Optional[RoutingRules] = None, guard: bool = False,
                tuning: str = REUSE, main: Optional[Dispatcher] = None, exact: Optional[Dispatcher] = None,
                monitor: Optional[QualityMonitor] = None) -> tuple[Any, PatchState]:
    """A clone of `model` whose attention calls go through a Dispatcher for `priority`.

    The original MODEL is not touched. `rules` and `guard` (Advanced node) add an exact
    dispatcher and the hooks that route calls to it. `tuning` (nodes.tuning) says
    whether `auto_tuned` reuses saved decisions or measures again. The Sparse node
    brings its own dispatchers (`main`: the sparse backend with its settings; `exact`:
    where routed calls go) and a quality `monitor`, told every model call's position.
    """
    require_override()
    import comfy.patcher_extension as extension

    advanced = rules is not None or guard
    rules = rules or RoutingRules()
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE_KEY)
    passed_on_to = passthrough_name(previous)
    masks = MaskCache()  # one read of each mask tensor per model call, whichever dispatcher serves it
    if main is None:
        priority = parse_priority(priority)
        main = Dispatcher(priority, strict=strict, tuner=make_tuner(priority, tuning), mask_cache=masks,
                          passthrough=passed_on_to, measurer=make_measurer(priority, tuning))
    if exact is None and advanced:
        exact = Dispatcher(list(EXACT_PRIORITY), mask_cache=masks, passthrough=passed_on_to)
    # The Sparse node's own dispatchers report passed-on calls by where they went too.
    for dispatcher in (main, exact):
        if dispatcher is not None:
            dispatcher.passthrough = passed_on_to
    state = PatchState(node_id=node_id, node_type=node_type, selection=selection, strict=strict,
                       main=main, exact=exact, monitor=monitor)
    # A key of its own, so a second Attention Backend node downstream adds its hooks beside ours.
    key = f"attention_backends.{uuid.uuid4().hex}"

    route = None
    if guard or rules.has_step_window or rules.has_block_filter or rules.cross_max_keys:
        route = build_route(state, rules, BlockLayout(patched.model.diffusion_model))
    if rules.has_step_window or monitor is not None:
        patched.add_wrapper_with_key(extension.WrappersMP.APPLY_MODEL, key, step_window_wrapper(
            state, rules, None if monitor is None else monitor.model_call))
    if guard:
        patched.add_wrapper_with_key(extension.WrappersMP.APPLY_MODEL, key, guard_wrapper(state))
    patched.add_wrapper_with_key(extension.WrappersMP.APPLY_MODEL, key, mask_boundary_wrapper(state))
    # Innermost of ours (wrappers run in the order added): it may re-run a model call of a
    # compiled model, and the hooks above must see that call once.
    patched.add_wrapper_with_key(extension.WrappersMP.APPLY_MODEL, key, compile_watch_wrapper(state))
    patched.add_wrapper_with_key(extension.WrappersMP.OUTER_SAMPLE, key, run_wrapper(state))

    state.override = build_override(state, previous, route)
    options[OVERRIDE_KEY] = state.override
    return patched, state
