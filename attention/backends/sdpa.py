"""PyTorch's scaled_dot_product_attention: its own choice and each sub-backend forced.

`sdpa` lets PyTorch pick (on Hopper with a current PyTorch that is the cuDNN kernel).
The forced variants call `torch.nn.functional.scaled_dot_product_attention` under
`torch.nn.attention.sdpa_kernel`, never ComfyUI's `comfy.ops` wrapper, which sets a
priority of its own on some platforms (DESIGN §3).

PyTorch's rules for its fused kernels change between releases, so beside the declared
constraints each forced variant asks PyTorch itself (`can_use_*_attention`) once per
call signature, and reports PyTorch's own reasons when it says no.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..backend import BHND, Backend, Kernel
from ..call import MASK_ADDITIVE, MASK_BOOL, MASK_INTEGER
from ..probes import cuda_reasons
from ..constraints import (ComputeCapability, DeviceTypes, DTypes, HeadDims, KeyHeads, Masks, NoMask,
                           OnDevice)

_HALF = frozenset({torch.float16, torch.bfloat16})
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_ANY_MASK = Masks(frozenset({MASK_BOOL, MASK_ADDITIVE, MASK_INTEGER}))


def default_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                   scale: Optional[float], layout: str) -> torch.Tensor:
    """The `sdpa` backend's kernel: PyTorch picks; compiled graphs trace it (compiled.py)."""
    if q.shape[1] != k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _forced(backend_name: str) -> Callable[[], Kernel]:
    def load() -> Kernel:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        choice = [getattr(SDPBackend, backend_name)]

        def kernel(q, k, v, mask, scale, layout):
            with sdpa_kernel(choice):
                return default_kernel(q, k, v, mask, scale, layout)
        return kernel
    return load


def _load_default() -> Kernel:
    return default_kernel


def _pytorch_says(check_name: str) -> Callable[..., list[str]]:
    """Ask PyTorch whether its sub-backend takes these exact tensors, with its reasons."""
    def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> list[str]:
        if q.device.type != "cuda":
            return []
        can_use = getattr(torch.backends.cuda, check_name, None)
        params_type = getattr(torch.backends.cuda, "SDPAParams", None)
        if can_use is None or params_type is None:
            return []
        try:
            params = params_type(q, k, v, mask, 0.0, False, q.shape[1] != k.shape[1])
        except TypeError:  # older PyTorch: no enable_gqa argument
            params = params_type(q, k, v, mask, 0.0, False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = can_use(params, True)
        if ok:
            return []
        said = [str(w.message).strip() for w in caught] or ["PyTorch declined the call"]
        return ["PyTorch: " + s for s in said]
    return check


BACKENDS = (
    Backend(
        name="sdpa",
        family="sdpa",
        description="PyTorch scaled_dot_product_attention with PyTorch's own kernel choice",
        quantized=False,
        layouts=(BHND,),
        constraints=(_ANY_MASK, KeyHeads(gqa=True)),
        load=_load_default,
    ),
    Backend(
        name="sdpa_flash",
        family="sdpa",
        description="SDPA forced to its FlashAttention-2 kernel (on the CPU: PyTorch's CPU flash kernel)",
        quantized=False,
        layouts=(BHND,),
        constraints=(
            DeviceTypes(frozenset({"cuda", "cpu"})),
            OnDevice("cuda", ComputeCapability((8, 0))),
            OnDevice("cuda", DTypes(_HALF)),
            OnDevice("cuda", HeadDims(maximum=256, equal_v=True)),
            OnDevice("cuda", NoMask()),
            OnDevice("cpu", DTypes(_FLOATS)),
            OnDevice("cpu", _ANY_MASK),
            KeyHeads(gqa=True),
        ),
        load=_forced("FLASH_ATTENTION"),
        runtime_check=_pytorch_says("can_use_flash_attention"),
    ),
    Backend(
        name="sdpa_efficient",
        family="sdpa",
        description="SDPA forced to its memory-efficient (xFormers-derived) kernel",
        quantized=False,
        layouts=(BHND,),
        constraints=(
            DeviceTypes(frozenset({"cuda"})),
            ComputeCapability((5, 0)),
            DTypes(frozenset({torch.float16, torch.bfloat16, torch.float32})),
            _ANY_MASK,
            KeyHeads(gqa=False),
        ),
        load=_forced("EFFICIENT_ATTENTION"),
        probe=lambda kernel: cuda_reasons(),
        runtime_check=_pytorch_says("can_use_efficient_attention"),
    ),
    Backend(
        name="sdpa_cudnn",
        family="sdpa",
        description="SDPA forced to its cuDNN kernel",
        quantized=False,
        layouts=(BHND,),
        constraints=(
            DeviceTypes(frozenset({"cuda"})),
            ComputeCapability((8, 0)),
            DTypes(_HALF),
            HeadDims(maximum=256, multiple_of=8),
            _ANY_MASK,
            KeyHeads(gqa=False),
        ),
        load=_forced("CUDNN_ATTENTION"),
        probe=lambda kernel: cuda_reasons(),
        runtime_check=_pytorch_says("can_use_cudnn_attention"),
    ),
    Backend(
        name="sdpa_math",
        family="sdpa",
        description="SDPA forced to its reference math path (materialises the score matrix)",
        quantized=False,
        layouts=(BHND,),
        constraints=(_ANY_MASK, KeyHeads(gqa=True)),
        load=_forced("MATH"),
        # The score matrix of a video call is tens of GiB: never measured by auto_tuned.
        tunable=False,
    ),
)
