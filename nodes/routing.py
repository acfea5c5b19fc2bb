"""The Advanced node's rules for sending calls to exact attention.

- Step window: steps whose position in the schedule (i / steps, 0 for the first step)
  lies outside [start, end) use exact attention. Decided once per model call by an
  APPLY_MODEL wrapper, at the cost of reading the current sigma (one synchronisation
  per model call, and only when the window is narrower than the whole run).
- Block filters: the first / last N attention blocks of the model, counted in
  execution order, use exact attention. Positions come from what the model writes
  into transformer_options: `block_type`/`block_index`/`total_blocks` (Flux, Wan,
  Qwen-Image, ... on ComfyUI 0.8.0 and newer) or the UNet's `block`.
- Cross-attention with short keys (Nk <= threshold, Nk != Nq) uses exact attention.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, Callable, Optional

import torch

from ..attention import Dispatcher
from .override import Route
from .state import PatchState

# A model call at sigma s belongs to the last schedule step whose sigma is >= s, with
# this relative slack for sigmas that went through a dtype round trip.
_SIGMA_SLACK = 1e-4


@dataclasses.dataclass(frozen=True)
class RoutingRules:
    step_start: float = 0.0
    step_end: float = 1.0
    first_blocks: int = 0
    last_blocks: int = 0
    cross_max_keys: int = 0  # 0: rule off

    @property
    def has_step_window(self) -> bool:
        return self.step_start > 0.0 or self.step_end < 1.0

    @property
    def has_block_filter(self) -> bool:
        return self.first_blocks > 0 or self.last_blocks > 0

    def problems(self) -> list[str]:
        """Why these settings make no sense (empty when they do)."""
        found = []
        if not 0.0 <= self.step_start < self.step_end <= 1.0:
            found.append(f"the step window needs 0 <= start < end <= 1 (got start {self.step_start}, "
                         f"end {self.step_end})")
        if min(self.first_blocks, self.last_blocks, self.cross_max_keys) < 0:
            found.append("block counts and the key threshold cannot be negative")
        return found


class BlockLayout:
    """Where an attention call sits among a model's attention blocks."""

    def __init__(self, diffusion_model: torch.nn.Module) -> None:
        # Flux-style models run their "double" stack, then their "single" stack; each
        # stack reports only its own index and size.
        self.doubles = len(getattr(diffusion_model, "double_blocks", None) or ())
        self.singles = len(getattr(diffusion_model, "single_blocks", None) or ())
        self.unet = _unet_positions(diffusion_model)
        self.unet_blocks = len(self.unet)

    def position(self, transformer_options: dict) -> Optional[tuple[int, int]]:
        """(position, number of blocks) of the call, or None if the model does not say."""
        kind = transformer_options.get("block_type")
        if kind is not None:
            index = transformer_options.get("block_index")
            total = transformer_options.get("total_blocks")
            if index is None or total is None:
                return None
            if kind == "single":
                return self.doubles + index, self.doubles + total
            return index, total + self.singles
        block = transformer_options.get("block")
        position = self.unet.get(block) if block is not None else None
        return None if position is None else (position, self.unet_blocks)


def _unet_positions(diffusion_model: torch.nn.Module) -> dict[tuple[str, int], int]:
    """UNet `block` keys ("input"/"middle"/"output", index) that hold attention, numbered
    in execution order. Empty for models that are not ComfyUI's UNet."""
    from comfy.ldm.modules.attention import SpatialTransformer

    middle = getattr(diffusion_model, "middle_block", None)
    stages = (("input", getattr(diffusion_model, "input_blocks", None) or ()),
              ("middle", () if middle is None else (middle,)),
              ("output", getattr(diffusion_model, "output_blocks", None) or ()))
    keys = [(stage, index) for stage, blocks in stages for index, block in enumerate(blocks)
            if any(isinstance(module, SpatialTransformer) for module in block.modules())]
    return {key: position for position, key in enumerate(keys)}


def build_route(state: PatchState, rules: RoutingRules, layout: BlockLayout) -> Route:
    """Per call: the exact dispatcher if a rule (or the guard's pin) says so, else the main one."""
    main, exact = state.main, state.exact
    if exact is None:
        raise ValueError("routing needs the state's exact dispatcher")
    first, last = rules.first_blocks, rules.last_blocks
    blocks = rules.has_block_filter
    max_keys = rules.cross_max_keys

    def route(q: torch.Tensor, k: torch.Tensor, skip_reshape: bool, options: dict) -> Dispatcher:
        if state.pinned:
            return exact
        if state.step_exact:
            next(state.routed_step)
            return exact
        if blocks:
            where = layout.position(options.get("transformer_options") or {})
            if where is None:
                next(state.block_unknown)
            elif where[0] < first or where[0] >= where[1] - last:
                next(state.routed_block)
                return exact
        if max_keys:
            axis = 2 if skip_reshape else 1  # token axis of (B, H, N, D) / (B, N, H*D)
            keys = k.shape[axis]
            if keys <= max_keys and keys != q.shape[axis]:
                next(state.routed_cross)
                return exact
        return main

    return route


def step_position(transformer_options: dict, schedule_cache: list) -> Optional[float]:
    """i / steps for the model call being made, or None without schedule information.

    `schedule_cache` holds [schedule tensor, its values as floats]: the schedule is read
    back once per run, the current sigma once per model call.
    """
    schedule = transformer_options.get("sample_sigmas")
    sigma = transformer_options.get("sigmas")
    if schedule is None or sigma is None or schedule.numel() < 2:
        return None
    if schedule_cache[0] is not schedule:
        schedule_cache[0] = schedule
        schedule_cache[1] = [-s for s in schedule.flatten().tolist()]  # ascending, for bisect
    negated = schedule_cache[1]
    current = float(sigma.flatten()[0])
    at_or_above = bisect.bisect_right(negated, -current * (1.0 - _SIGMA_SLACK))
    steps = len(negated) - 1
    return min(max(at_or_above - 1, 0), steps - 1) / steps


def step_window_wrapper(state: PatchState, rules: RoutingRules,
                        on_position: Optional[Callable[[Optional[float]], None]] = None) -> Callable:
    """APPLY_MODEL wrapper: decide, once per model call, whether it is outside the window.
    `on_position` is told each model call's schedule position (the quality monitor)."""
    schedule_cache: list = [None, []]

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        # apply_model passes transformer_options as its sixth positional argument.
        options = kwargs.get("transformer_options", args[5] if len(args) > 5 else None) or {}
        position = step_position(options, schedule_cache)
        if position is None:
            next(state.step_unknown)
            state.step_exact = False
        else:
            state.step_exact = not rules.step_start <= position < rules.step_end
        if on_position is not None:
            on_position(position)
        return executor(*args, **kwargs)

    return wrapper
