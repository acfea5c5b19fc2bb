"""xFormers' memory_efficient_attention.

It takes (B, N, H, D) and an additive bias whose last dim must sit on 8-element
aligned rows, so a mask is copied into a padded buffer (as ComfyUI's own xformers
path does). A bool or integer mask becomes additive (-inf where not attended).
xFormers 0.0.35 is the only build for torch >= 2.10 and targets CUDA 12: on a CUDA 13
stack it imports but finds no operator, which the self-call catches.
"""

from __future__ import annotations

import torch

from ..backend import BNHD, Backend, Kernel, Package
from ..call import MASK_ADDITIVE, MASK_BOOL, MASK_INTEGER
from ..constraints import DeviceTypes, DTypes, HeadDims, KeyHeads, Masks
from ..probes import cuda_probe


def _aligned_bias(mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    b, n_q, h, _ = q.shape
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    n_k = mask.shape[-1]
    padded = torch.empty(mask.shape[0], mask.shape[1], n_q, (n_k + 7) // 8 * 8, dtype=q.dtype, device=q.device)
    padded[..., :n_k] = mask
    return padded[..., :n_k].expand(b, h, n_q, n_k)


def _load() -> Kernel:
    from xformers.ops import memory_efficient_attention

    def kernel(q, k, v, mask, scale, layout):
        bias = None if mask is None else _aligned_bias(mask, q)
        return memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)
    return kernel


BACKENDS = (
    Backend(
        name="xformers",
        family="xformers",
        description="xFormers memory_efficient_attention (its own operator choice)",
        quantized=False,
        layouts=(BNHD,),
        constraints=(
            DeviceTypes(frozenset({"cuda"})),
            DTypes(frozenset({torch.float16, torch.bfloat16, torch.float32})),
            HeadDims(maximum=256, equal_v=True),
            Masks(frozenset({MASK_BOOL, MASK_ADDITIVE, MASK_INTEGER})),
            KeyHeads(gqa=False),
        ),
        load=_load,
        package=Package("xformers", "xformers", "0.0.20",
                        "pip install xformers (the build must match your torch and CUDA)"),
        probe=cuda_probe(BNHD, (5, 0)),
        copies="masked calls: the mask, into an 8-aligned additive buffer",
    ),
)
