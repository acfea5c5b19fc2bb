"""Attention calls inside `torch.compile`: one opaque op, decided when it runs.

Under compile, dynamo would trace into the dispatcher: a first call that plans inside
the compiled region breaks the graph (locks, availability probes), and whatever the
trace read (the plan dict, the chosen kernel, the counters) is baked into the graph.
ComfyUI's TorchCompileModel also drops every guard that mentions `transformer_options`,
so a graph baked around one node's decision is reused after the node changed.

So a compiled call becomes one custom op, `attention_backends::attention`, whose
output shape is known from the call form alone (the fake implementation) and whose
real implementation runs when the graph runs: it finds its target by an integer
handle and serves the call exactly as an eager call would (plan lookup, kernel,
counters). The graph never depends on which backend serves a call, so it is never
stale and never recompiles when a choice changes; dynamo never sees a kernel,
a lock or a counter.

The op is defined with `torch.library.Library` rather than `custom_op`: its eager
dispatch skips custom_op's Python checks (about a quarter of the cost in a quick CPU
trial that was not kept), and it only
ever runs from a compiled graph. Eager calls never go through it.

Calls whose plan is plain SDPA can skip the op altogether: the ComfyUI side traces
PyTorch's SDPA into the graph (`traced_sdpa`), decided at trace time (`decided_at_trace`)
and checked when the graph runs by one `graph_ran` marker per graph (nodes/compiled.py).
Through the op, SDXL's compiled step was 10 ms longer for its 140 calls, about 70 µs a
call (benchmarks/results/h200/e2e_compile/before_traced_sdpa/), more than its short calls
can hide.

Targets: a `Dispatcher` registers itself (standalone use); the ComfyUI side registers
one target that serves whichever node's run is active. The registry lives in one
process-wide module so that two copies of the pack loaded side by side share it.
"""

from __future__ import annotations

import sys
import threading
import types
import weakref
from typing import Callable, Optional, Protocol

import torch
import torch._dynamo
from torch.fx.experimental.symbolic_shapes import guard_scalar

from .backend import BHND
from .backends.sdpa import default_kernel as _sdpa_kernel
from .call import FLAT, HEADS_FIRST
from .layout import input_view, output_view

_NAMESPACE = "attention_backends"
_OP = "attention"
# Shared by every copy of the pack in this process (ComfyUI may load two checkouts).
_SHARED_MODULE = "_attention_backends_compiled_registry"

_SCHEMA = (f"{_OP}(Tensor q, Tensor k, Tensor v, Tensor? mask, int heads, bool skip_reshape, "
           "bool skip_output_reshape, float? scale, str? attn_precision, bool low_precision, bool enable_gqa, "
           "int target, str where, str func) -> Tensor")

_MARKER = "graph_ran"
_MARKER_SCHEMA = f"{_MARKER}(Tensor like, int graph) -> Tensor"

# Whether dynamo is tracing (torch >= 2.3); older torch never traces through the pack.
is_compiling: Callable[[], bool] = getattr(torch.compiler, "is_compiling", None) or (lambda: False)
# torch.library.register_fake is torch >= 2.4; impl_abstract is its earlier name.
_register_fake = getattr(torch.library, "register_fake", None) or getattr(torch.library, "impl_abstract")

# attn_precision crosses the op as text (dtypes are not a schema type on every torch).
_PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CompiledCall(Protocol):
    """What a target serves: one attention call made from a compiled graph."""

    def serve_compiled(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                       heads: int, *, skip_reshape: bool, skip_output_reshape: bool, scale: Optional[float],
                       attn_precision: Optional[torch.dtype], low_precision: bool, enable_gqa: bool,
                       where: str, func: str) -> torch.Tensor: ...


def _output_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, skip_reshape: bool,
                  skip_output_reshape: bool) -> tuple:
    if skip_reshape:
        batch, heads_q, tokens, _ = q.shape
        head_dim_v = v.shape[-1]
    else:
        batch, tokens, width = q.shape
        heads_q = heads
        heads_kv = k.shape[-1] // (width // heads)
        head_dim_v = v.shape[-1] // heads_kv
    if skip_output_reshape:
        return (batch, heads_q, tokens, head_dim_v)
    return (batch, tokens, heads_q * head_dim_v)


class _Registry:
    """Targets by handle, and the op that reaches them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.targets: "weakref.WeakValueDictionary[int, CompiledCall]" = weakref.WeakValueDictionary()
        self.pinned: dict[int, CompiledCall] = {}
        self.next_handle = 1
        # Told the id of each graph marker that runs (nodes/compiled.py sets it).
        self.marker_sink: Optional[Callable[[int], None]] = None
        self.library = self._define()

    def _define(self) -> torch.library.Library:
        library = torch.library.Library(_NAMESPACE, "DEF")
        tags = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)
        # cudagraph_unsafe: the op decides in Python at each call (and may tune, which
        # synchronises); a CUDA graph would freeze the first decision and its counters.
        library.define(_SCHEMA, tags=tags)
        library.impl(_OP, self._run, "CompositeExplicitAutograd")
        _register_fake(f"{_NAMESPACE}::{_OP}", _fake, lib=library)
        # graph_ran: no tensor work, so nothing to freeze in a CUDA graph either way; it
        # returns a zero that the graph adds to an output, so it is never eliminated.
        library.define(_MARKER_SCHEMA, tags=tags)
        library.impl(_MARKER, self._marker, "CompositeExplicitAutograd")
        _register_fake(f"{_NAMESPACE}::{_MARKER}", _fake_marker, lib=library)
        return library

    def _marker(self, like: torch.Tensor, graph: int) -> torch.Tensor:
        sink = self.marker_sink
        if sink is not None:
            sink(graph)
        return like.new_zeros(())

    def register(self, target: CompiledCall, *, pinned: bool = False) -> int:
        with self.lock:
            handle = self.next_handle
            self.next_handle += 1
            if pinned:
                self.pinned[handle] = target
            else:
                self.targets[handle] = target
        return handle

    def _run(self, q, k, v, mask, heads, skip_reshape, skip_output_reshape, scale, attn_precision, low_precision,
             enable_gqa, target, where, func):
        serving = self.pinned.get(target) or self.targets.get(target)
        if serving is None:
            raise RuntimeError(
                "a compiled graph refers to an attention dispatcher that no longer exists. Compile the model "
                "again (or call torch._dynamo.reset()) after replacing its Dispatcher.")
        out = serving.serve_compiled(
            q, k, v, mask, heads, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape, scale=scale,
            attn_precision=None if attn_precision is None else _PRECISIONS[attn_precision],
            low_precision=low_precision, enable_gqa=enable_gqa, where=where, func=func)
        # The fake implementation promises a contiguous tensor; a kernel's output view
        # (e.g. BNHD returned as heads-first) is made to match, once, here.
        return out.contiguous()


def _fake(q, k, v, mask, heads, skip_reshape, skip_output_reshape, scale, attn_precision, low_precision, enable_gqa,
          target, where, func):
    return q.new_empty(_output_shape(q, k, v, heads, skip_reshape, skip_output_reshape))


def _fake_marker(like, graph):
    return like.new_empty(())


def _registry() -> _Registry:
    shared = sys.modules.get(_SHARED_MODULE)
    if shared is None:
        shared = types.ModuleType(_SHARED_MODULE)
        shared.registry = _Registry()
        sys.modules[_SHARED_MODULE] = shared
    return shared.registry


def register_target(target: CompiledCall, *, pinned: bool = False) -> int:
    """A handle for `target`, to bake into compiled graphs. Weakly held unless `pinned`
    (a process-wide target that must outlive every graph referring to it)."""
    return _registry().register(target, pinned=pinned)


def set_marker_sink(sink: Optional[Callable[[int], None]]) -> None:
    """What runs when a graph's `graph_ran` marker runs (one sink per process)."""
    _registry().marker_sink = sink


def graph_ran(like: torch.Tensor, graph: int) -> torch.Tensor:
    """A zero scalar that tells the marker sink, when the graph runs, that graph `graph`
    ran; add it to a tensor the graph returns so that it is kept."""
    return torch.ops.attention_backends.graph_ran.default(like, graph)


# Runs a function at trace time with constant arguments and records its result as a
# constant (torch >= 2.1); dynamo does not trace into it, so it may take locks and plan.
decided_at_trace: Callable[[Callable], Callable] = torch._dynamo.assume_constant_result


def static_sizes(t: torch.Tensor) -> tuple:
    """t's sizes as ints at trace time: a dynamic size is specialised (guarded) to its
    current value, so a decision made from the sizes holds for every run of the graph."""
    return tuple(guard_scalar(size) for size in t.shape)


def traced_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, skip_reshape: bool,
                skip_output_reshape: bool, scale: Optional[float]) -> torch.Tensor:
    """The `sdpa` backend's call in a form dynamo traces: the same views as its prepared
    run (layout.py), PyTorch's SDPA, the same output form."""
    layout_in = HEADS_FIRST if skip_reshape else FLAT
    heads_q = q.shape[1] if skip_reshape else heads
    head_dim = q.shape[-1] if skip_reshape else q.shape[-1] // heads
    heads_kv = k.shape[1] if skip_reshape else k.shape[-1] // head_dim
    kernel_out = _sdpa_kernel(input_view(layout_in, BHND, heads_q, False)(q),
                              input_view(layout_in, BHND, heads_kv, False)(k),
                              input_view(layout_in, BHND, heads_kv, False)(v), None, scale, BHND)
    return output_view(BHND, HEADS_FIRST if skip_output_reshape else FLAT)(kernel_out)


def precision_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    """attn_precision as the op carries it."""
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    if name not in _PRECISIONS:
        raise ValueError(f"attn_precision {dtype} is not one ComfyUI passes (float32, float16, bfloat16)")
    return name


_registry()  # the op exists as soon as the pack is imported


def compiled_attention(target: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       mask: Optional[torch.Tensor], *, skip_reshape: bool, skip_output_reshape: bool,
                       scale: Optional[float], attn_precision: Optional[torch.dtype], low_precision: bool,
                       enable_gqa: bool = False, where: str = "", func: str = "") -> torch.Tensor:
    """The call as the compiled graph records it: one opaque op (see the module doc)."""
    return torch.ops.attention_backends.attention.default(
        q, k, v, mask, heads, skip_reshape, skip_output_reshape, None if scale is None else float(scale),
        precision_name(attn_precision), bool(low_precision), bool(enable_gqa), target, where, func)
