"""Which layers of a diffusion model should reach the override, and which calls did not.

The run report says "the override was never invoked" or "some calls bypassed it" only
with evidence:

- attention layers: modules whose class's `forward` calls one of ComfyUI's attention
  functions (`attention_*` of comfy.ldm.modules.attention, with or without `wrap_attn`),
  directly or through one helper such as Flux's `attention`, found by reading the
  bytecode once per class. A model without any has nothing for the node to serve.
- replaced forwards: packs such as ComfyUI-NAG swap an attention layer's `forward`
  for their own, which may call attention without `transformer_options` and so
  without the override. For the run, each such layer gets a pre- and post-hook that
  compares the override's call count before and after the layer ran: a layer call
  that added nothing bypassed the override. Layers keep their class's forward in a
  normal run, so no hook is added and nothing is paid per call.

Finding the layers walks every module of the model (2,034 in SDXL's UNet), twice per run:
16 ms of Python per run on our CPU, 0.22 ms with the layers kept per model and re-checked
each run along their paths only (`parent._modules[name] is child`, a few hundred lookups;
benchmarks/report_overhead.py, results in benchmarks/results/cpu/report_overhead/). A
layer or any module above it replaced (an object patch, another pack's wrapper) makes the
next run walk the model again. An attention module added at a new path beside unchanged
ones is not seen until one of those changes; it only ever costs the report's layer count
and coverage warnings, never which attention a call gets.
"""

from __future__ import annotations

import dataclasses
import dis
import functools
import threading
import types
import weakref
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

# Where ComfyUI's attention functions live (`wrap_attn` keeps their name and module).
ATTENTION_MODULE = "comfy.ldm.modules.attention"
# How far a forward may be from the attention function: Flux's blocks call flux.math.attention,
# which calls optimized_attention.
_HELPER_DEPTH = 1


def _is_comfy_attention(value: Any) -> bool:
    return (callable(value) and getattr(value, "__module__", None) == ATTENTION_MODULE
            and str(getattr(value, "__name__", "")).startswith("attention"))


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _code_objects(constant)


def calls_comfy_attention(function: Any, depth: int = _HELPER_DEPTH) -> bool:
    """Whether `function`'s code names ComfyUI's attention (or a helper that does)."""
    function = getattr(function, "__func__", function)
    code = getattr(function, "__code__", None)
    namespace = getattr(function, "__globals__", None)
    if code is None or namespace is None:
        return False
    for block in _code_objects(code):
        for instruction in dis.get_instructions(block):
            if instruction.opname != "LOAD_GLOBAL":
                continue
            value = namespace.get(instruction.argval)
            if _is_comfy_attention(value):
                return True
            if depth > 0 and isinstance(value, types.FunctionType) and calls_comfy_attention(value, depth - 1):
                return True
    return False


@functools.lru_cache(maxsize=256)
def _is_attention_class(cls: type) -> bool:
    return calls_comfy_attention(getattr(cls, "forward", None))


# (parent, child name, child); parent None for the model itself.
_Link = tuple[Optional[torch.nn.Module], str, torch.nn.Module]


@dataclasses.dataclass(frozen=True)
class _FoundLayers:
    """A model's attention layers, and every (parent, child name, child) link on the paths
    from the model to them: while each link holds, the layers are where they were found.
    A link from the model itself has parent None: the model is the cache's weak key, and a
    strong reference to it here would keep it alive."""

    layers: tuple[tuple[str, torch.nn.Module], ...]
    links: tuple[_Link, ...]

    def still_in_place(self, root: torch.nn.Module) -> bool:
        return all((root if parent is None else parent)._modules.get(name) is child
                   for parent, name, child in self.links)


def _links(root: torch.nn.Module, names: Iterable[str]) -> tuple[_Link, ...]:
    links: dict[tuple[int, str], _Link] = {}
    for name in names:
        parent = root
        for part in filter(None, name.split(".")):
            child = parent._modules[part]
            links.setdefault((id(parent), part), (None if parent is root else parent, part, child))
            parent = child
    return tuple(links.values())


_found: "weakref.WeakKeyDictionary[torch.nn.Module, _FoundLayers]" = weakref.WeakKeyDictionary()
_found_lock = threading.Lock()


def attention_layers(diffusion_model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every module whose class's forward calls ComfyUI's attention
    (kept per model while every module on their paths stays in place)."""
    with _found_lock:
        found = _found.get(diffusion_model)
    if found is None or not found.still_in_place(diffusion_model):
        layers = tuple((name, module) for name, module in diffusion_model.named_modules()
                       if _is_attention_class(type(module)))
        found = _FoundLayers(layers, _links(diffusion_model, (name for name, _ in layers)))
        with _found_lock:
            _found[diffusion_model] = found
    return list(found.layers)


def replaced_forward(module: torch.nn.Module) -> Optional[Callable]:
    """The function a pack put in place of the module's own forward, or None."""
    forward = module.__dict__.get("forward")
    if forward is None:
        return None
    function = getattr(forward, "__func__", forward)
    return None if function is getattr(type(module), "forward", None) else function


def function_label(function: Any) -> str:
    """`Class.method` or `function`, without `<locals>`, and its module: a name a user can
    trace to the pack that defined it."""
    function = getattr(function, "__func__", function)
    if isinstance(function, functools.partial):
        function = function.func
    qualname = getattr(function, "__qualname__", None) or type(function).__qualname__
    return qualname.replace(".<locals>", "")


def function_origin(function: Any) -> str:
    """The module that defined `function`; for a custom node pack (ComfyUI names those
    modules by their folder's path), the pack's folder name."""
    function = getattr(function, "__func__", function)
    if isinstance(function, functools.partial):
        function = function.func
    module = getattr(function, "__module__", None) or type(function).__module__ or "?"
    folder = module.replace("\\", "/").rsplit("/", 1)
    return folder[1].split(".")[0] if len(folder) == 2 else module


@dataclasses.dataclass
class ReplacedLayers:
    """Attention layers whose forward one function replaced, and what their calls did this run."""

    replacement: str
    origin: str
    names: list[str]
    calls: int = 0  # layer calls seen this run
    bypassed: int = 0  # layer calls during which the override received nothing

    def to_json(self) -> dict:
        return {"replacement": self.replacement, "origin": self.origin, "layers": len(self.names),
                "example": self.names[0], "calls": self.calls, "bypassed": self.bypassed}


def group_replaced(layers: Iterable[tuple[str, torch.nn.Module]]) -> dict[Any, ReplacedLayers]:
    """Replaced attention layers, grouped by the function that replaced them."""
    groups: dict[Any, ReplacedLayers] = {}
    for name, module in layers:
        function = replaced_forward(module)
        if function is None:
            continue
        if function not in groups:
            groups[function] = ReplacedLayers(function_label(function), function_origin(function), [])
        groups[function].names.append(name)
    return groups


class BypassProbe:
    """Counts, for one sampler run, the calls of replaced attention layers that did not
    reach the override. `received` returns how many calls the override has had so far."""

    def __init__(self, diffusion_model: torch.nn.Module, received: Callable[[], int]) -> None:
        self.layers = attention_layers(diffusion_model)
        self.groups = group_replaced(self.layers)
        self._received = received
        self._handles: list[Any] = []
        modules = dict(self.layers)
        for function, group in self.groups.items():
            for name in group.names:
                self._watch(modules[name], group)

    def _watch(self, module: torch.nn.Module, group: ReplacedLayers) -> None:
        entries: list[int] = []

        def before(_module: Any, _args: Any) -> None:
            entries.append(self._received())

        def after(_module: Any, _args: Any, _output: Any) -> None:
            if not entries:
                return
            group.calls += 1
            if self._received() == entries.pop():
                group.bypassed += 1

        self._handles.append(module.register_forward_pre_hook(before))
        self._handles.append(module.register_forward_hook(after))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Coverage:
    """The model's attention layers, and those a pack replaced (with what their calls did)."""

    def __init__(self, layers: int, replaced: list[ReplacedLayers]) -> None:
        self.layers = layers
        self.replaced = replaced

    def bypassing(self) -> list[ReplacedLayers]:
        return [group for group in self.replaced if group.bypassed]


def run_coverage(probe: Optional[BypassProbe], diffusion_model: Any) -> Optional[Coverage]:
    """What a finished run's probe saw (None without a probe: coverage unknown)."""
    if probe is None:
        return None
    replaced = list(probe.groups.values())
    if not replaced and isinstance(diffusion_model, torch.nn.Module):
        # Forwards replaced after the run started (object patches applied when the model loads).
        replaced = list(group_replaced(attention_layers(diffusion_model)).values())
    return Coverage(len(probe.layers), replaced)
