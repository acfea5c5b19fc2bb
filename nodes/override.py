"""The function installed as `transformer_options["optimized_attention_override"]`.

ComfyUI's `wrap_attn` calls it as `override(func, *args, **kwargs)` for every attention
call of the patched MODEL (DESIGN §3). It is a closure on purpose: `ModelPatcher.clone()`
deep-copies model_options, which keeps functions by reference but would copy a callable
object, and with it the dispatcher's plans and counters.

Hot path: unpack the call, pick a dispatcher, call it. No logging, no synchronisation;
the only allocation is the fallback lambda.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..attention import Dispatcher
from .state import PatchState

# (q, k, v, heads, options) -> the dispatcher that serves this call.
Route = Callable[[torch.Tensor, torch.Tensor, bool, dict], Dispatcher]
Override = Callable[..., torch.Tensor]

# The positional order of ComfyUI's attention functions: (q, k, v, heads, mask=None,
# attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs).
_POSITIONAL = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
_REQUIRED = _POSITIONAL[:4]


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


def build_override(state: PatchState, previous: Optional[Override] = None,
                   route: Optional[Route] = None) -> Override:
    """The override for one patched MODEL.

    previous: the override the MODEL already carried, chained for passed-on calls.
    route: picks the dispatcher per call (Advanced node); None serves every call from
        `state.main`.
    """
    main = state.main
    pass_on = _pass_on(previous)

    def override(func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(args) == 4:
            q, k, v, heads = args
            options = kwargs
        else:
            options = _bind(args, kwargs)
            if options is None:
                state.unknown_form += 1
                return pass_on(func, args, kwargs)
            q, k, v, heads = options["q"], options["k"], options["v"], options["heads"]
        skip_reshape = options.get("skip_reshape", False)
        dispatcher = main if route is None else route(q, k, skip_reshape, options)
        return dispatcher(q, k, v, heads, options.get("mask"), skip_reshape=skip_reshape,
                          skip_output_reshape=options.get("skip_output_reshape", False),
                          scale=options.get("scale"), attn_precision=options.get("attn_precision"),
                          low_precision=options.get("low_precision_attention", True),
                          fallback=lambda: pass_on(func, args, kwargs))

    return override
