"""The model-call boundary of mask classifications.

A model builds its masks once per model call and hands the same tensor to every block
(attention.masks); the classification of each tensor is kept for that model call and
forgotten at its end, by this APPLY_MODEL wrapper. It runs outside any compiled graph
(TorchCompileModel compiles the diffusion model inside apply_model), and reads nothing.
"""

from __future__ import annotations

from typing import Any, Callable

from .state import PatchState


def mask_boundary_wrapper(state: PatchState) -> Callable:
    """APPLY_MODEL wrapper: one model call, one set of mask classifications."""
    masks = state.main.masks

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        with masks.model_call():
            return executor(*args, **kwargs)

    return wrapper
