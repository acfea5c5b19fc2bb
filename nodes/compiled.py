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
- Calls whose plan is plain SDPA are traced as SDPA itself (`TracedSdpa`): the op's
  Python would cost more than SDXL's short calls. The trace decides them with the
  active node's dispatcher; one marker per graph counts them when the graph runs and
  checks that the node now running would decide the same, else the model call runs
  again on a fresh trace.
- A graph traced *without* our override (the model was compiled and run before the
  node was added) never calls us. `compile_watch_wrapper` notices a model call of a
  compiled model that did not reach the override, drops that model's compiled code
  so dynamo traces it again with the override, and re-runs the call; a model whose
  attention really bypasses the override is remembered and left alone.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import threading
import weakref
from typing import Any, Callable, Iterator, Optional

import torch

from ..attention.call import describe_call, device_capability
from ..attention.compiled import decided_at_trace, register_target, set_marker_sink
from ..attention.counters import count_value
from ..attention.dispatch import Dispatcher, Plan, plan_key
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

# What `traced_decision` answers for a call site: run it through the op, or trace SDPA.
THROUGH_OP = -1
TRACED = 0  # a positive answer is TRACED too, and the id of the graph whose marker goes here


def _consume(counter: "itertools.count", calls: int) -> None:
    """Advance an itertools.count by `calls` (in C: counters are bumped from several threads)."""
    collections.deque(itertools.islice(counter, calls), maxlen=0)


def _plan_counts(dispatchers: list[Dispatcher]) -> dict[Plan, int]:
    return {plan: count_value(plan.counter) for dispatcher in dispatchers for plan in dispatcher.plans()}


class TracedSdpa:
    """Compiled calls run as SDPA traced into the graph, and their counting.

    While a plain node of ours (no routing, tuning, quality monitor or head split) is the
    active run, `enabled` is True; the traced override reads it, so dynamo guards on it:
    a graph holding traced SDPA never runs while no such node is active, and a graph
    traced for one that is not never holds it. Each call site of a trace asks
    `decide` (at trace time) whether the node's plan for it is plain SDPA; the first such
    site of a model call's trace adds the graph's `graph_ran` marker, and every such site
    is recorded under that graph. When a graph runs, its marker counts each recorded
    site once for the active node and checks that this node would decide the same; if
    not (the node changed to another backend), the model call runs again on a fresh
    trace (compile_watch_wrapper), with the counts of the discarded call undone.

    A site traced twice within one model call's trace (dynamo restarting a frame after
    a graph break elsewhere) would be counted twice; the pack itself breaks no graph.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._lock = threading.Lock()
        self._graphs: dict[int, list[tuple[tuple, Any]]] = {}
        self._next_graph = 1
        self._local = threading.local()
        set_marker_sink(self._graph_ran)

    @staticmethod
    def eligible(state: Optional[PatchState]) -> bool:
        """A node whose every call is decided by its main dispatcher from the call alone."""
        return (state is not None and state.exact is None and state.monitor is None and state.tuner is None
                and state.head_group is None)

    def follow(self, state: Optional[PatchState]) -> None:
        """Enable traced SDPA for the run now active (None: no run of ours)."""
        self.enabled = self.eligible(state)

    @contextlib.contextmanager
    def model_call(self) -> Iterator[None]:
        """Around one model call: a trace made inside it records its sites under one graph."""
        earlier = getattr(self._local, "graph", None)
        self._local.graph = 0
        try:
            yield
        finally:
            self._local.graph = earlier

    def decide(self, q_shape: tuple, k_shape: tuple, v_shape: tuple, dtype: str, device: str, heads: int,
               skip_reshape: bool, skip_output_reshape: bool, precision: Optional[str], low_precision: bool,
               scale_is_none: bool) -> int:
        """At trace time: THROUGH_OP, or TRACED (with the graph id where this site adds the marker)."""
        state = ACTIVE_RUNS.current()
        graph = getattr(self._local, "graph", None)
        if graph is None or not self.eligible(state):
            return THROUGH_OP
        torch_dtype, torch_device = getattr(torch, dtype), torch.device(device)
        attn_precision = None if precision is None else getattr(torch, precision)
        meta = [torch.empty(shape, dtype=torch_dtype, device="meta") for shape in (q_shape, k_shape, v_shape)]
        call = dataclasses.replace(
            describe_call(*meta, heads, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                          attn_precision=attn_precision, low_precision_ok=low_precision,
                          custom_scale=not scale_is_none),
            device_type=torch_device.type, compute_capability=device_capability(torch_device))
        if not state.main.runs_traced_sdpa(call):
            return THROUGH_OP
        key = plan_key(q_shape, k_shape, v_shape, torch_dtype, torch_device, heads, skip_reshape,
                       skip_output_reshape, attn_precision, low_precision, scale_is_none)
        with self._lock:
            marker = 0
            if graph == 0:
                graph = marker = self._next_graph
                self._next_graph += 1
                self._graphs[graph] = []
                self._local.graph = graph
            self._graphs[graph].append((key, call))
        return marker

    def _graph_ran(self, graph: int) -> None:
        state = ACTIVE_RUNS.current()
        if state is None:
            return
        state.invoked = True
        counts = state.traced_counts.get(graph)
        dispatcher = state.main
        if counts is None or any(dispatcher.current_plan(key) is not plan for key, plan, _ in counts):
            # Worked out once per graph and kept across runs while the plans stay (a plan
            # made again, after a failure or an eviction, makes it work out again).
            counts = state.traced_counts[graph] = self._counts_for(dispatcher, graph)
        if not counts:
            state.traced_mismatch = True
            return
        for _, plan, calls in counts:
            _consume(plan.counter, calls)
            _consume(state.traced_calls, calls)

    def _counts_for(self, dispatcher: Dispatcher, graph: int) -> list[tuple[tuple, Plan, int]]:
        """(plan key, plan, calls) for one run of `graph`, for this dispatcher; empty when it
        would not run every site of the graph as SDPA."""
        sites = self._graphs.get(graph, [])
        calls: dict[tuple, int] = collections.Counter()
        for key, call in sites:
            if not dispatcher.runs_traced_sdpa(call):
                return []
            dispatcher.traced_plan(key, call)
            calls[key] += 1
        return [(key, dispatcher.current_plan(key), n) for key, n in calls.items()]


TRACED_SDPA = TracedSdpa()


@decided_at_trace
def traced_decision(q_shape: tuple, k_shape: tuple, v_shape: tuple, dtype: str, device: str, heads: int,
                    skip_reshape: bool, skip_output_reshape: bool, precision: Optional[str], low_precision: bool,
                    scale_is_none: bool) -> int:
    """TracedSdpa.decide, run by dynamo at trace time (its answer is a constant of the graph)."""
    return TRACED_SDPA.decide(q_shape, k_shape, v_shape, dtype, device, heads, skip_reshape, skip_output_reshape,
                              precision, low_precision, scale_is_none)


# Diffusion models whose attention does not reach the override even when traced again.
_bypassing: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _diffusion_model(executor: Any) -> Optional[torch.nn.Module]:
    model = getattr(getattr(executor, "class_obj", None), "diffusion_model", None)
    return getattr(model, "_orig_mod", model)


def compile_watch_wrapper(state: PatchState) -> Callable:
    """APPLY_MODEL wrapper: a model call of a compiled model that never reached the
    override ran a graph traced without it; trace again and re-run that call."""

    def run(executor: Any, args: tuple, kwargs: dict) -> Any:
        state.invoked = False
        state.traced_mismatch = False
        with TRACED_SDPA.model_call():
            return executor(*args, **kwargs)

    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> Any:
        if not state.compiled:
            return executor(*args, **kwargs)
        before = _plan_counts([d for _, d in state.dispatchers()])
        output = run(executor, args, kwargs)
        if state.invoked and not state.traced_mismatch:
            return output
        model = _diffusion_model(executor)
        if model is None or (model in _bypassing and not state.traced_mismatch):
            return output
        from torch._dynamo.eval_frame import remove_from_cache

        if state.traced_mismatch:
            # A graph traced for another node's choices: undo what the discarded call counted.
            for _, dispatcher in state.dispatchers():
                for plan in dispatcher.plans():
                    plan.counter = itertools.count(before.get(plan, 0))
            log.info("attention backends: the compiled %s ran a graph traced for another node's backends; "
                     "compiling it again for this node", type(model).__name__)
        else:
            log.info("attention backends: the compiled %s ran a graph traced without this node's attention; "
                     "compiling it again with it", type(model).__name__)
        remove_from_cache(model)
        state.recompiled_stale += 1
        output = run(executor, args, kwargs)
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
        TRACED_SDPA.follow(ACTIVE_RUNS.current())


def end_compiled_run(state: PatchState) -> None:
    """At the end of a sampler run: compiled graphs serve through the run still active, if any."""
    ACTIVE_RUNS.end(state)
    TRACED_SDPA.follow(ACTIVE_RUNS.current())
