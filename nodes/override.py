"""The function installed as `transformer_options["optimized_attention_override"]`.

ComfyUI's `wrap_attn` calls it as `override(func, *args, **kwargs)` for every attention
call of the patched MODEL (DESIGN §3). It is a closure on purpose: `ModelPatcher.clone()`
deep-copies model_options, which keeps functions by reference but would copy a callable
object, and with it the dispatcher's plans and counters.

Hot path: unpack the call, pick a dispatcher, call it. No logging, no synchronisation,
no allocation but the dispatcher's key (a call no backend serves comes back as None and
is passed on here, so no fallback closure is made per call).

Under torch.compile (TorchCompileModel) the override is traced, not run: it records
one opaque op (compiled.py) whose real implementation, when the graph runs, serves
the call through the node whose run is active, by the same `serve` as an eager call.
Nothing the trace reads depends on this node's settings, so a graph made with one node
(or none) stays correct for every other.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..attention import Dispatcher
from ..attention.compiled import compiled_attention, graph_ran, is_compiling, precision_name, static_sizes, traced_sdpa
from . import compiled
from .compiled import COMFY_TARGET, THROUGH_OP, block_where, traced_decision
from .state import PatchState

# (q, k, skip_reshape, options) -> the dispatcher that serves this call.
Route = Callable[[torch.Tensor, torch.Tensor, bool, dict], Dispatcher]
Override = Callable[..., torch.Tensor]
# (func, q, k, v, heads, options, args, kwargs) -> output: one call served by a node.
Serve = Callable[[Callable, torch.Tensor, torch.Tensor, torch.Tensor, int, dict, tuple, dict], torch.Tensor]

# The positional order of ComfyUI's attention functions: (q, k, v, heads, mask=None,
# attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs).
_POSITIONAL = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
_REQUIRED = _POSITIONAL[:4]
# Keywords a compiled call can carry through the op; anything else is passed on as traced.
_CARRIED = frozenset(_POSITIONAL) | {"scale", "enable_gqa", "low_precision_attention", "transformer_options",
                                     "_inside_attn_wrapper"}


def _bind(args: tuple, kwargs: dict) -> Optional[dict]:
    """Every argument by name, for calls not in the usual (q, k, v, heads) + keywords
    form (heads as a keyword, mask as a fifth positional); None if not ComfyUI's form."""
    if len(args) > len(_POSITIONAL):
        return None
    options = dict(kwargs)
    options.update(zip(_POSITIONAL, args))
    if any(options.get(name) is None for name in _REQUIRED):
        return None
    return options


def _pass_on(previous: Optional[Override]) -> Callable[[Callable, tuple, dict], torch.Tensor]:
    """Where calls that no backend of ours serves go: the override this MODEL carried
    before ours (another pack, core's attention nodes) or else ComfyUI's own function.
    `kwargs` still holds `_inside_attn_wrapper`, so neither re-enters an override."""
    if previous is None:
        return lambda func, args, kwargs: func(*args, **kwargs)
    return lambda func, args, kwargs: previous(func, *args, **kwargs)


def _compiled_call(func: Callable, args: tuple, kwargs: dict, pass_on: Callable) -> torch.Tensor:
    """What the trace records for one call: the opaque op, or (for a call it cannot
    carry) the function the call would have reached without this node."""
    options = kwargs if len(args) == 4 else _bind(args, kwargs)
    if options is None or any(key not in _CARRIED for key, value in options.items() if value is not None):
        return pass_on(func, args, kwargs)
    q, k, v, heads = args if len(args) == 4 else (options["q"], options["k"], options["v"], options["heads"])
    traced = _traced_sdpa(q, k, v, heads, options)
    if traced is not None:
        return traced
    return compiled_attention(
        COMFY_TARGET.handle, q, k, v, heads, options.get("mask"), skip_reshape=options.get("skip_reshape", False),
        skip_output_reshape=options.get("skip_output_reshape", False), scale=options.get("scale"),
        attn_precision=options.get("attn_precision"),
        low_precision=options.get("low_precision_attention", True), enable_gqa=options.get("enable_gqa", False),
        where=block_where(options.get("transformer_options")), func=getattr(func, "__name__", ""))


def _traced_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, options: dict) -> Optional[torch.Tensor]:
    """SDPA traced into the graph when the active node's plan for this call is plain SDPA
    (nodes/compiled.py: TracedSdpa); None for a call that goes through the op."""
    # Read in traced code, so dynamo guards on it (see TracedSdpa).
    if not compiled.TRACED_SDPA.enabled or options.get("mask") is not None or options.get("enable_gqa"):
        return None
    skip_reshape = options.get("skip_reshape", False)
    skip_output_reshape = options.get("skip_output_reshape", False)
    scale = options.get("scale")
    decision = traced_decision(static_sizes(q), static_sizes(k), static_sizes(v), str(q.dtype).replace("torch.", ""),
                               str(q.device), heads, skip_reshape, skip_output_reshape,
                               precision_name(options.get("attn_precision")),
                               options.get("low_precision_attention", True), scale is None)
    if decision == THROUGH_OP:
        return None
    out = traced_sdpa(q, k, v, heads, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                      scale=scale)
    return out if decision == 0 else out + graph_ran(out, decision)


def build_override(state: PatchState, previous: Optional[Override] = None,
                   route: Optional[Route] = None) -> Override:
    """The override for one patched MODEL.

    previous: the override the MODEL already carried, chained for passed-on calls.
    route: picks the dispatcher per call (Advanced node); None serves every call from
        `state.main`.
    """
    main = state.main
    pass_on = _pass_on(previous)

    def serve(func: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, options: dict,
              args: tuple, kwargs: dict) -> torch.Tensor:
        state.invoked = True
        get = options.get
        skip_reshape = get("skip_reshape", False)
        dispatcher = main if route is None else route(q, k, skip_reshape, options)
        out = dispatcher.serve(q, k, v, heads, get("mask"), skip_reshape, get("skip_output_reshape", False),
                               get("scale"), get("attn_precision"), get("low_precision_attention", True), True)
        return pass_on(func, args, kwargs) if out is None else out

    def override(func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if is_compiling():
            return _compiled_call(func, args, kwargs, pass_on)
        if len(args) == 4:
            q, k, v, heads = args
            options = kwargs
        else:
            options = _bind(args, kwargs)
            if options is None:
                next(state.unknown_form)
                return pass_on(func, args, kwargs)
            q, k, v, heads = options["q"], options["k"], options["v"], options["heads"]
        return serve(func, q, k, v, heads, options, args, kwargs)

    state.serve = serve
    return override
