"""Machine checks shared by the GPU backends' availability probes.

A backend that imports is not yet a backend that runs: a wheel built for another CUDA
(xFormers 0.0.35 on CUDA 13) imports fine and then finds no operator. So every GPU
backend's probe ends with a tiny self-call compared against PyTorch's math path.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .backend import BHND, BNHD, Kernel

# Error budget for the self-call: generous enough for INT8/FP8 kernels on random
# inputs, tight enough that a kernel returning garbage or zeros fails.
SELF_TEST_MAX_REL_L1 = 0.05


def cuda_reasons(minimum: tuple[int, int] = (0, 0), majors: Optional[frozenset[int]] = None) -> list[str]:
    """Reasons no visible CUDA device can run a kernel needing `minimum` capability
    (and, when given, one of the major versions in `majors`)."""
    if not torch.cuda.is_available():
        return ["no CUDA GPU is visible to PyTorch"]
    capabilities = [tuple(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    suitable = [cc for cc in capabilities
                if cc >= minimum and (majors is None or cc[0] in majors)]
    if suitable:
        return []
    have = ", ".join("sm%d%d" % cc for cc in capabilities)
    want = "sm%d%d+" % minimum if majors is None else "/".join(f"sm{m}x" for m in sorted(majors))
    return [f"needs a {want} GPU, this machine has {have}"]


def suitable_device(minimum: tuple[int, int] = (0, 0), majors: Optional[frozenset[int]] = None) -> torch.device:
    for i in range(torch.cuda.device_count()):
        cc = tuple(torch.cuda.get_device_capability(i))
        if cc >= minimum and (majors is None or cc[0] in majors):
            return torch.device("cuda", i)
    raise RuntimeError("no suitable CUDA device")


def self_test(kernel: Kernel, layout: str, device: torch.device, *, dtype: torch.dtype = torch.float16,
              head_dim: int = 64, mask: bool = False) -> list[str]:
    """Run a tiny call through `kernel` and compare it with an fp32 reference."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, h, n = 1, 2, 128
    q, k, v = (torch.randn(b, h, n, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    attn_mask = None
    if mask:
        attn_mask = torch.zeros(1, 1, n, n, dtype=dtype)
        attn_mask[..., n // 2:] = -math.inf
        attn_mask = attn_mask.to(device)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(),
        attn_mask=None if attn_mask is None else attn_mask.float())
    args = (q, k, v) if layout == BHND else tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))
    out = kernel(*args, attn_mask, None, layout)
    if layout == BNHD:
        out = out.transpose(1, 2)
    out = out.float()
    if not torch.isfinite(out).all():
        return ["self-test produced non-finite values"]
    rel = ((out - ref).abs().sum() / ref.abs().sum()).item()
    if rel > SELF_TEST_MAX_REL_L1:
        return [f"self-test output disagrees with the reference (relative L1 {rel:.3g})"]
    return []


def cuda_probe(layout: str, minimum: tuple[int, int] = (0, 0), majors: Optional[frozenset[int]] = None,
               dtype: torch.dtype = torch.float16, head_dim: int = 64,
               mask: bool = False) -> Callable[[Kernel], list[str]]:
    """Probe for a CUDA kernel: a suitable GPU exists and a tiny self-call is right."""
    def probe(kernel: Kernel) -> list[str]:
        reasons = cuda_reasons(minimum, majors)
        if reasons:
            return reasons
        return self_test(kernel, layout, suitable_device(minimum, majors), dtype=dtype,
                         head_dim=head_dim, mask=mask)
    return probe
