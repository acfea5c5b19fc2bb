"""The node's side of compiled models (TorchCompileModel): which node serves a call that
comes back from a compiled graph, and what to do when a graph bypasses every node.

ComfyUI's TorchCompileModel drops every dynamo guard that mentions
`transformer_options` (0.8.0 and newer), so a graph is reused whatever override the
options now hold. Two consequences, each handled here:

- A graph traced with one of our overrides holds the op of attention/compiled.py with
  one fixed target, `COMFY_TARGET`. When the graph runs, that target serves the call
  through the node whose sampler run is active (`ACTIVE_RUNS`), or, when no node of
  ours is in this run (the node was removed), through ComfyUI's own function, found by
  the name the trace recorded. So changing, removing or re-adding the node never needs
  a recompile and never fails.
- A graph traced *without* our override (the model was compiled and run before the
  node was added) never calls us. `compile_watch_wrapper` notices a model call of a
  compiled model that did not reach the override, drops that model's compiled code
  so dynamo traces it again with the override, and re-runs the call; a model whose
  attention really bypasses the override is remembered and left alone.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from typing import Any, Callable, Optional

import torch

from ..attention.compiled import register_target
from .state import PatchState

log = logging.getLogger(__name__)

# model_options key TorchCompileModel sets (comfy_api.torch_helpers, 0.3.64 to 0.28).
TORCH_COMPILE_KWARGS = "torch_compile_kwargs"

# Keys of transformer_options that say where a call sits (nodes/routing.py reads them).
_WHERE_KEYS = ("block_type", "block_index", "total_blocks")


def block_where(transformer_options: Optional[dict]) -> str:
    """The block position of a call, as text the compiled op can carry (read at trace
    time: a call site's block is fixed by the model's structure)."""
    if not transformer_options:
        return ""
    parts = [f"{key}={transformer_options[key]}" for key in _WHERE_KEYS if transformer_options.get(key) is not None]
    block = transformer_options.get("block")
    if isinstance(block, (tuple, list)) and len(block) == 2:
        parts.append(f"block={block[0]}:{block[1]}")
    return ";".join(parts)


@functools.lru_cache(maxsize=4096)
def _where_options(where: str) -> dict:
    """transformer_options rebuilt from `block_where` text (cached: one per call site)."""
    options: dict[str, Any] = {}
    for part in filter(None, where.split(";")):
        key, _, value = part.partition("=")
        if key == "block":
            stage, _, index = value.partition(":")
            options["block"] = (stage, int(index))
        elif key == "block_type":
            options[key] = value
        else:
            options[key] = int(value)
    return options


@functools.lru_cache(maxsize=64)
def comfy_function(name: str) -> Optional[Callable]:
    """ComfyUI's attention function called `name` (the one a call reached when it was
    traced), or None. Cached: it is looked up on every call from a compiled graph, and
    ComfyUI registers its functions at import."""
    import comfy.ldm.modules.attention as attention

    function = getattr(attention, name, None)
    if callable(function):
        return function
    registered = getattr(attention, "REGISTERED_ATTENTION_FUNCTIONS", {}) or {}
    return next((f for f in registered.values() if getattr(f, "__name__", None) == name), None)


class ActiveRuns:
    """The nodes whose sampler run is under way and whose override is the one installed.

    Process-wide, not per thread: ComfyUI 0.28's multi-GPU sampling makes model calls
    from one thread per device inside the run that registered here.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: list[PatchState] = []

    def begin(self, state: PatchState) -> None:
        with self._lock:
            self._states.append(state)

    def end(self, state: PatchState) -> None:
        with self._lock:
            if state in self._states:
                self._states.remove(state)

    def current(self) -> Optional[PatchState]:
        states = self._states
        return states[-1] if states else None


ACTIVE_RUNS = ActiveRuns()


class ComfyTarget:
    """The target every graph traced with one of our overrides calls (attention/compiled.py)."""

    def __init__(self) -> None:
        self.handle = register_target(self, pinned=True)
        self._warned: set[str] = set()

    def serve_compiled(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                       heads: int, *, skip_reshape: bool, skip_output_reshape: bool, scale: Optional[float],
                       attn_precision: Optional[torch.dtype], low_precision: bool, enable_gqa: bool, where: str,
                       func: str) -> torch.Tensor:
        kwargs: dict[str, Any] = {"mask": mask, "attn_precision": attn_precision, "skip_reshape": skip_reshape,
                                  "skip_output_reshape": skip_output_reshape,
                                  "low_precision_attention": low_precision,
                                  "transformer_options": _where_options(where), "_inside_attn_wrapper": True}
        if scale is not None:
            kwargs["scale"] = scale
        if enable_gqa:
            kwargs["enable_gqa"] = True
        function = comfy_function(func)
        state = ACTIVE_RUNS.current()
        if state is None or state.serve is None:
            # A graph traced with a node that this run's workflow no longer has: ComfyUI's own attention.
            return self._comfy(function, func)(q, k, v, heads, **kwargs)
        next(state.compiled_calls)
        return state.serve(self._comfy(function, func), q, k, v, heads, kwargs, (q, k, v, heads), kwargs)

    def _comfy(self, function: Optional[Callable], name: str) -> Callable:
        if function is not None:
            return function
        if name not in self._warned:
            self._warned.add(name)
            log.warning("attention backends: ComfyUI has no attention function %r (a compiled graph recorded "
                        "it); such calls use ComfyUI's attention_pytorch", name)
        return comfy_function("attention_pytorch")


COMFY_TARGET = ComfyTarget()

# Diffusion models whose attention does not reach the override even when traced again.
_bypassing: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _diffusion_model(executor: Any) -> Optional[torch.nn.Module]:
    model = getattr(getattr(executor, "class_obj", None), "diffusion_model", None)
    return getattr(model, "_orig_mod", model)


def compile_watch_wrapper(state: PatchState) -> Callable:
    """APPLY_MODEL wrapper: a model call of a compiled model that never reached the
    override ran a graph traced without it; trace again and re-run that call."""

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        if not state.compiled:
            return executor(*args, **kwargs)
        state.invoked = False
        output = executor(*args, **kwargs)
        if state.invoked:
            return output
        model = _diffusion_model(executor)
        if model is None or model in _bypassing:
            return output
        from torch._dynamo.eval_frame import remove_from_cache

        log.info("attention backends: the compiled %s ran a graph traced without this node's attention; "
                 "compiling it again with it", type(model).__name__)
        remove_from_cache(model)
        state.recompiled_stale += 1
        output = executor(*args, **kwargs)
        if not state.invoked:
            # Still not reached after a fresh trace: this model's attention bypasses the override.
            _bypassing.add(model)
        return output

    return wrapper


def begin_compiled_run(state: PatchState, model_options: dict, installed: bool) -> None:
    """At the start of a sampler run: note whether the model is compiled, and make this
    node the one compiled graphs serve through while its override is the installed one."""
    state.compiled = TORCH_COMPILE_KWARGS in model_options
    if installed:
        ACTIVE_RUNS.begin(state)
