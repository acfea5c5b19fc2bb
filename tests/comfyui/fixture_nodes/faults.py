"""Test-only nodes for the fault suite through a real server (never shipped).

- FaultyKernel makes one backend of the loaded pack misbehave on its Nth call: raise,
  return NaN, or hold the call until the user interrupts the run. The fault fires once;
  the kernel is itself again afterwards (a transient fault, which the next run retries).
- ModelState passes a MODEL on and tells what ComfyUI's attention functions and the
  model's options are at that point: a run after a fault must find them as before.
- LatentDigest tells whether a latent is finite and hashes it: "the same output".
- PlanCount tells how many plans the pack's override holds after a run (bounded growth).

The pack is found among the modules ComfyUI loaded (a name it makes up from the folder),
never imported here: importing it again would make a second copy.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

import comfy.model_management

FAULTS = ("raise", "nan", "wait_for_interrupt")
# A held call gives up after this long, so a test that never interrupts cannot hang the server.
HOLD_LIMIT_S = 120.0
OVERRIDE_KEY = "optimized_attention_override"

# (id of a Backend object) -> its own kernel, so that each FaultyKernel run wraps the original.
_originals: dict[int, Callable] = {}


def _pack_modules(suffix: str) -> list[Any]:
    """Every loaded copy of the pack's module `suffix` (e.g. "attention.registry")."""
    return [module for name, module in list(sys.modules.items())
            if module is not None and name.endswith("." + suffix) and not name.startswith(("comfy", "torch"))]


class _Faulty:
    """`kernel`, except that its `on_call`-th call (from now) misbehaves once."""

    def __init__(self, kernel: Callable, fault: str, on_call: int, marker: str) -> None:
        self.kernel, self.fault, self.on_call, self.marker = kernel, fault, on_call, marker
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self.lock:
            self.calls += 1
            fire = self.calls == self.on_call
        if not fire:
            return self.kernel(*args, **kwargs)
        if self.fault == "raise":
            raise RuntimeError(f"injected fault on call {self.on_call}")
        output = self.kernel(*args, **kwargs)
        if self.fault == "nan":
            return torch.full_like(output, float("nan"))
        # Held inside the kernel until ComfyUI's interrupt flag is set (POST /interrupt);
        # the marker tells the test that the run is inside the kernel now.
        Path(self.marker).write_text("holding")
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not comfy.model_management.processing_interrupted():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no interrupt within {HOLD_LIMIT_S}s")
            time.sleep(0.01)
        return output


class FaultyKernel:
    CATEGORY = "testing/attention_backends"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "arm"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "backend": ("STRING", {"default": "sdpa_math"}),
            "fault": (list(FAULTS),),
            "on_call": ("INT", {"default": 1, "min": 1, "max": 1 << 20}),
            "marker": ("STRING", {"default": ""}),
            "token": ("INT", {"default": 0, "min": 0, "max": 1 << 31}),  # a new token arms it again
        }}

    def arm(self, model, backend, fault, on_call, marker, token):
        registries = _pack_modules("attention.registry")
        if not registries:
            raise RuntimeError("the attention backends pack is not loaded")
        for registry in registries:
            target = registry.get(backend)
            if not target.availability().available:
                raise RuntimeError(f"{backend} is not available here: cannot inject a fault into it")
            original = _originals.setdefault(id(target), target._kernel)
            target._kernel = _Faulty(original, fault, on_call, marker)
        return (model,)


def _attention_functions() -> dict[str, str]:
    """Every comfy module's binding of `optimized_attention` (a global patch replaces them)."""
    return {name: f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
            for name, module in sorted(sys.modules.items())
            if name.startswith("comfy.") and module is not None
            for fn in [getattr(module, "optimized_attention", None)] if fn is not None}


def _options_state(model) -> dict[str, Any]:
    options = model.model_options
    transformer = options.get("transformer_options", {})
    return {"model_options": sorted(options), "transformer_options": sorted(transformer),
            "override": OVERRIDE_KEY in transformer,
            "wrappers": {kind: sorted(keys) for kind, keys in transformer.get("wrappers", {}).items()},
            "callbacks": {kind: sorted(keys) for kind, keys in transformer.get("callbacks", {}).items()}}


class ModelState:
    CATEGORY = "testing/attention_backends"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "tell"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "token": ("INT", {"default": 0, "min": 0, "max": 1 << 31})}}

    def tell(self, model, token):
        state = {"attention": _attention_functions(), "options": _options_state(model)}
        return {"ui": {"state": [json.dumps(state, sort_keys=True)]}, "result": (model,)}


class LatentDigest:
    CATEGORY = "testing/attention_backends"
    RETURN_TYPES = ()
    FUNCTION = "digest"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def digest(self, samples):
        latent = samples["samples"].detach().to("cpu", torch.float32).contiguous()
        return {"ui": {"digest": [hashlib.sha256(latent.numpy().tobytes()).hexdigest()],
                       "finite": [bool(torch.isfinite(latent).all())]}}


class PlanCount:
    CATEGORY = "testing/attention_backends"
    RETURN_TYPES = ()
    FUNCTION = "count"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        # `samples` only orders this node after the sampler that ran the model.
        return {"required": {"model": ("MODEL",), "samples": ("LATENT",)}}

    def count(self, model, samples):
        state = _closure_state(model.model_options["transformer_options"][OVERRIDE_KEY])
        plans = {route: len(dispatcher._plans) for route, dispatcher in state.dispatchers()}
        limit = _pack_modules("attention.dispatch")[0].MAX_PLANS
        return {"ui": {"plans": [json.dumps(plans)], "limit": [limit]}}


def _closure_state(override: Callable) -> Any:
    """The PatchState an override function closes over."""
    for cell in getattr(override, "__closure__", None) or ():
        value = cell.cell_contents
        if hasattr(value, "dispatchers"):
            return value
    raise RuntimeError(f"no PatchState in {override!r}")


NODE_CLASS_MAPPINGS = {
    "AttentionBackendsTestFaultyKernel": FaultyKernel,
    "AttentionBackendsTestModelState": ModelState,
    "AttentionBackendsTestLatentDigest": LatentDigest,
    "AttentionBackendsTestPlanCount": PlanCount,
}
