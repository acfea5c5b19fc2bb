"""SageAttention: INT8 Q·K with FP16 or FP8 P·V (1.x from the registry, 2.x from source),
and SageAttention 3 (FP4, Blackwell).

Quirks handled here (DESIGN §4):
- sageattention 1.x subtracts the key mean *in place on the caller's k* when
  `smooth_k=True`. The adapter does the subtraction out of place (one copy of k, the
  same arithmetic) and calls the kernel with `smooth_k=False`.
- `sageattn` accepts an `attn_mask` keyword and ignores it. No sage backend declares
  mask support, so a masked call never reaches one.
- FP16 accumulation of P·V is a known source of black images; the CUDA variants are
  called with FP32 accumulation.
- `sageattn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
  is_causal, sm_scale, smooth_k)` (2.x) is the Triton INT8 Q·K / FP16 P·V kernel on packed
  rows, so it is the variable-length entry of `sage_qk_int8_pv_fp16_triton` only. It
  sizes its scale buffers from `cu_seqlens` on the host: one synchronisation per call,
  inside SageAttention. Its key smoothing subtracts one mean from every packed key,
  which leaves each row's softmax unchanged.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..backend import BHND, BNHD, Backend, Kernel, Package, Varlen, installed_version
from ..constraints import (CapabilityFamilies, ComputeCapability, DefaultScale, DeviceTypes, DTypes, Exactness, HeadDims,
                           KeyBlockPadding, KeyHeads, NoMask)
from ..probes import cuda_probe

_HALF = frozenset({torch.float16, torch.bfloat16})
_TENSOR_LAYOUT = {BHND: "HND", BNHD: "NHD"}
_SEQ_DIM = {BHND: 2, BNHD: 1}

_SAGE1 = Package("sageattention", "sageattention", "1.0.6", "pip install sageattention")
_SAGE2 = Package("sageattention", "sageattention", "2.0.0",
                 "SageAttention 2 is built from source: see the README's 'Optional kernels'")
_SAGE3 = Package("sageattn3", "sageattn3", None,
                 "SageAttention 3 is built from source for Blackwell GPUs: see the README")

_COMMON = (DeviceTypes(frozenset({"cuda"})), DTypes(_HALF), NoMask(), KeyHeads(gqa=True),
           Exactness(quantized=True))
# Head dims the 1.x Triton kernels are written for; 2.x pads others up to 128, but
# 64/96/128 is what both versions have been seen to serve correctly.
_SAGE_HEAD_DIMS = HeadDims(allowed=frozenset({64, 96, 128}), equal_v=True)
_SAGE2_HEAD_DIMS = HeadDims(maximum=128, multiple_of=8, equal_v=True)


def _sage_major() -> int:
    version = installed_version("sageattention") or "0"
    return int(version.split(".")[0] or 0)


def _load_sage() -> Kernel:
    from sageattention import sageattn
    in_place_smoothing = _sage_major() < 2

    def kernel(q, k, v, mask, scale, layout):
        if in_place_smoothing:
            k = k - k.mean(dim=_SEQ_DIM[layout], keepdim=True)
        return sageattn(q, k, v, tensor_layout=_TENSOR_LAYOUT[layout], is_causal=False, sm_scale=scale,
                        smooth_k=not in_place_smoothing)
    return kernel


def _load_variant(function_name: str, **fixed) -> Callable[[], Kernel]:
    def load() -> Kernel:
        import sageattention
        function = getattr(sageattention, function_name)

        def kernel(q, k, v, mask, scale, layout):
            out = function(q, k, v, tensor_layout=_TENSOR_LAYOUT[layout], is_causal=False, sm_scale=scale,
                           **fixed)
            return out[0] if isinstance(out, tuple) else out
        return kernel
    return load


def _load_sage3() -> Kernel:
    from sageattn3 import sageattn3_blackwell

    def kernel(q, k, v, mask, scale, layout):
        # sageattn3_blackwell takes (B, H, N, D) and always uses 1/sqrt(D)
        return sageattn3_blackwell(q, k, v, is_causal=False)
    return kernel


def _load_triton_varlen() -> Varlen:
    from sageattention import sageattn_varlen

    def packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
        return sageattn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal=False,
                               sm_scale=scale)
    return Varlen(packed)


def _variant(name: str, description: str, function_name: str, capability: tuple[int, int],
             majors: Optional[frozenset[int]] = None, load_varlen: Optional[Callable[[], Varlen]] = None,
             **fixed) -> Backend:
    constraints = _COMMON + (ComputeCapability(capability), _SAGE2_HEAD_DIMS)
    if majors is not None:
        constraints += (CapabilityFamilies(majors),)
    return Backend(
        name=name, family="sage", description=description, quantized=True, layouts=(BNHD, BHND),
        constraints=constraints, load=_load_variant(function_name, **fixed), package=_SAGE2,
        probe=cuda_probe(BHND, capability, majors), load_varlen=load_varlen,
    )


BACKENDS = (
    Backend(
        name="sage",
        family="sage",
        description="SageAttention's own per-architecture choice (1.x: Triton INT8/FP16; 2.x: CUDA INT8/FP8)",
        quantized=True,
        layouts=(BNHD, BHND),
        constraints=_COMMON + (ComputeCapability((8, 0)), _SAGE_HEAD_DIMS, KeyBlockPadding(64, 0.01)),
        load=_load_sage,
        package=_SAGE1,
        probe=cuda_probe(BHND, (8, 0)),
        copies="1.x: one copy of k (key-mean subtraction done out of place; the kernel would do it in place)",
    ),
    _variant("sage_qk_int8_pv_fp16_triton", "SageAttention 2 Triton kernel: INT8 Q·K, FP16 P·V",
             "sageattn_qk_int8_pv_fp16_triton", (8, 0), load_varlen=_load_triton_varlen),
    _variant("sage_qk_int8_pv_fp16_cuda", "SageAttention 2 CUDA kernel: INT8 Q·K, FP16 P·V (FP32 accumulation)",
             "sageattn_qk_int8_pv_fp16_cuda", (8, 0), pv_accum_dtype="fp32"),
    _variant("sage_qk_int8_pv_fp8_cuda", "SageAttention 2 CUDA kernel: INT8 Q·K, FP8 P·V (Ada and newer)",
             "sageattn_qk_int8_pv_fp8_cuda", (8, 9), pv_accum_dtype="fp32+fp32"),
    _variant("sage_qk_int8_pv_fp8_cuda_sm90", "SageAttention 2 Hopper kernel: INT8 Q·K, FP8 P·V (wgmma)",
             "sageattn_qk_int8_pv_fp8_cuda_sm90", (9, 0), frozenset({9}), pv_accum_dtype="fp32+fp32"),
    Backend(
        name="sage3",
        family="sage",
        description="SageAttention 3: FP4 microscaling attention for Blackwell GPUs",
        quantized=True,
        layouts=(BHND,),
        constraints=_COMMON + (CapabilityFamilies(frozenset({10, 12})), DefaultScale(),
                               HeadDims(allowed=frozenset({64, 128}), equal_v=True)),
        load=_load_sage3,
        package=_SAGE3,
        probe=cuda_probe(BHND, (10, 0), frozenset({10, 12})),
        contiguous=True,
    ),
)
