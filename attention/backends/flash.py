"""FlashAttention 2, 3 and 4 as standalone packages.

- FA2 (`flash-attn`): `flash_attn.flash_attn_func`, Ampere and newer.
- FA3 (`flash_attn_3`, module `flash_attn_interface`): Hopper.
- FA4 (`flash-attn-4`, module `flash_attn.cute`): Hopper and Blackwell, CuTe DSL,
  compiled on the first call of each shape.

Installing FA4 turns `flash_attn` into a namespace package, so "import flash_attn
works" says nothing about FA2. Availability here is decided by installed
distributions first (`flash-attn` for FA2), then by the function being there.
All three take (B, N, H, D) with a contiguous last dim, which ComfyUI's flat form is.
"""

from __future__ import annotations

import importlib

import torch

from ..backend import BNHD, Backend, Kernel, Package
from ..constraints import (CapabilityFamilies, ComputeCapability, DeviceTypes, DTypes, HeadDims, KeyHeads,
                           NoMask, OnCapabilityMajor)
from ..probes import cuda_probe

_HALF = frozenset({torch.float16, torch.bfloat16})
_COMMON = (DeviceTypes(frozenset({"cuda"})), DTypes(_HALF), NoMask(), KeyHeads(gqa=True))


def _function(module_name: str, attribute: str, what: str):
    module = importlib.import_module(module_name)
    function = getattr(module, attribute, None)
    if function is None:
        raise ImportError(f"{module_name} has no {attribute}: {what}")
    return function


def _load_fa2() -> Kernel:
    function = _function("flash_attn", "flash_attn_func",
                         "this 'flash_attn' is not FlashAttention 2 (flash-attn-4 alone installs a namespace)")

    def kernel(q, k, v, mask, scale, layout):
        return function(q, k, v, softmax_scale=scale, causal=False)
    return kernel


def _first(out):
    """FA3 returns out or (out, lse) depending on its version; FA4 returns (out, lse)."""
    return out[0] if isinstance(out, tuple) else out


def _load_fa3() -> Kernel:
    function = _function("flash_attn_interface", "flash_attn_func", "not a FlashAttention 3 build")

    def kernel(q, k, v, mask, scale, layout):
        return _first(function(q, k, v, softmax_scale=scale, causal=False))
    return kernel


def _load_fa4() -> Kernel:
    function = _function("flash_attn.cute", "flash_attn_func", "not a FlashAttention 4 build")

    def kernel(q, k, v, mask, scale, layout):
        return _first(function(q, k, v, softmax_scale=scale, causal=False))
    return kernel


BACKENDS = (
    Backend(
        name="flash",
        family="flash",
        description="FlashAttention 2 (flash-attn package)",
        quantized=False,
        layouts=(BNHD,),
        constraints=_COMMON + (ComputeCapability((8, 0)), HeadDims(maximum=256, equal_v=True)),
        load=_load_fa2,
        package=Package("flash_attn", "flash-attn", "2.0.0",
                        "pip install flash-attn (builds from source unless a wheel matches your torch/CUDA)"),
        probe=cuda_probe(BNHD, (8, 0)),
    ),
    Backend(
        name="flash3",
        family="flash",
        description="FlashAttention 3 for Hopper (flash_attn_interface)",
        quantized=False,
        layouts=(BNHD,),
        constraints=_COMMON + (CapabilityFamilies(frozenset({9})),
                               HeadDims(minimum=8, maximum=256, multiple_of=8, equal_v=True)),
        load=_load_fa3,
        package=Package("flash_attn_interface", "flash_attn_3", None,
                        "FlashAttention 3 is built from source (hopper/ in the flash-attention repository)"),
        probe=cuda_probe(BNHD, (9, 0), frozenset({9})),
    ),
    Backend(
        name="flash4",
        family="flash",
        description="FlashAttention 4 (flash-attn-4 package, CuTe DSL; compiles each shape on first use)",
        quantized=False,
        layouts=(BNHD,),
        constraints=_COMMON + (
            CapabilityFamilies(frozenset({9, 10, 11})),
            HeadDims(minimum=8, maximum=256, multiple_of=8),
            OnCapabilityMajor(frozenset({10, 11}), HeadDims(minimum=8, maximum=128, multiple_of=8)),
        ),
        load=_load_fa4,
        package=Package("flash_attn.cute", "flash-attn-4", "4.0.0b1", "pip install --pre flash-attn-4"),
        probe=cuda_probe(BNHD, (9, 0), frozenset({9, 10, 11})),
    ),
)
