"""FlashAttention 2, 3 and 4 as standalone packages.

- FA2 (`flash-attn`): `flash_attn.flash_attn_func`, Ampere and newer.
- FA3 (`flash_attn_3`, module `flash_attn_interface`): Hopper.
- FA4 (`flash-attn-4`, module `flash_attn.cute`): Hopper and Blackwell, CuTe DSL,
  compiled on the first call of each shape.

Installing FA4 turns `flash_attn` into a namespace package, so "import flash_attn
works" says nothing about FA2. Availability here is decided by installed
distributions first (`flash-attn` for FA2), then by the function being there.
All three take (B, N, H, D) with a contiguous last dim, which ComfyUI's flat form is.

Variable-length entries (for key-padding masks whose rows differ, mask_serving.py),
always called by keyword (FA4's signature put `qv` fourth):
- FA2 `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, dropout_p, softmax_scale, causal, ...)` returns out;
- FA3 `flash_attn_interface.flash_attn_varlen_func(...)` the same names (plus seqused_q/k)
  and returns out or (out, lse) by version;
- FA4 `flash_attn.cute.flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None,
  cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, ..., seqused_k=None, ...)`
  returns (out, lse) and also takes padded (B, N, H, D) k and v with `seqused_k` (int32,
  (B,)), which serves prefix padding without packing the keys.
"""

from __future__ import annotations

import importlib

import torch

from ..backend import BNHD, Backend, Kernel, Package, Varlen
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


def _packed(function):
    def packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
        return _first(function(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                               max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=scale,
                               causal=False))
    return packed


def _load_fa2_varlen() -> Varlen:
    return Varlen(_packed(_function("flash_attn", "flash_attn_varlen_func", "a FlashAttention 2 without varlen")))


def _load_fa3_varlen() -> Varlen:
    return Varlen(_packed(_function("flash_attn_interface", "flash_attn_varlen_func",
                                    "a FlashAttention 3 build without varlen")))


def _load_fa4_varlen() -> Varlen:
    function = _function("flash_attn.cute", "flash_attn_varlen_func", "a FlashAttention 4 build without varlen")

    def key_lengths(q, k, v, used_k, scale):
        return _first(function(q, k, v, seqused_k=used_k, softmax_scale=scale, causal=False))
    return Varlen(_packed(function), key_lengths)


BACKENDS = (
    Backend(
        name="flash",
        family="flash",
        description="FlashAttention 2 (flash-attn package)",
        quantized=False,
        layouts=(BNHD,),
        constraints=_COMMON + (ComputeCapability((8, 0)), HeadDims(maximum=256, equal_v=True)),
        load=_load_fa2,
        load_varlen=_load_fa2_varlen,
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
        load_varlen=_load_fa3_varlen,
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
        load_varlen=_load_fa4_varlen,
        package=Package("flash_attn.cute", "flash-attn-4", "4.0.0b1", "pip install --pre flash-attn-4"),
        probe=cuda_probe(BNHD, (9, 0), frozenset({9, 10, 11})),
    ),
)
