"""The non-finite guard: NaN/Inf caught per model call, never per attention call.

An APPLY_MODEL wrapper checks the model output once (one synchronisation per model
call). If it is not finite, that model call runs again with every attention call on the
exact dispatcher, and exact attention stays pinned for the rest of the sampler run.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .state import PatchState


def _finite(output: Any) -> bool:
    return bool(torch.isfinite(output).all())


def guard_wrapper(state: PatchState) -> Callable:
    """The APPLY_MODEL wrapper for one patched MODEL."""

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        output = executor(*args, **kwargs)
        if _finite(output):
            return output
        next(state.nonfinite_model_calls)
        if state.pinned:
            # Attention was exact already: the cause is elsewhere, re-running cannot help.
            next(state.nonfinite_exact)
            return output
        state.pinned = True
        next(state.reruns)
        output = executor(*args, **kwargs)
        if not _finite(output):
            next(state.nonfinite_exact)
        return output

    return wrapper
