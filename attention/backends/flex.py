"""PyTorch FlexAttention, compiled.

Measured slower than SDPA at every model shape on the H200 and recompiled per shape;
past the recompile limit it falls back to an eager path that materialises the score
matrix (851 GiB asked at Wan 720p). It is here so it can be measured and chosen by
hand, never by `auto` or `auto_tuned`.
"""

from __future__ import annotations

import torch

from ..backend import BHND, Backend, Kernel
from ..constraints import DeviceTypes, DTypes, HeadDims, KeyHeads, NoMask
from ..probes import cuda_reasons


def _load() -> Kernel:
    from torch.nn.attention.flex_attention import flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)

    def kernel(q, k, v, mask, scale, layout):
        return compiled(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return kernel


BACKENDS = (
    Backend(
        name="flex",
        family="flex",
        description="PyTorch FlexAttention through torch.compile (recompiles per shape)",
        quantized=False,
        layouts=(BHND,),
        constraints=(
            DeviceTypes(frozenset({"cuda"})),
            DTypes(frozenset({torch.float16, torch.bfloat16, torch.float32})),
            HeadDims(allowed=frozenset({16, 32, 64, 128, 256}), equal_v=True),
            NoMask(),
            KeyHeads(gqa=True),
        ),
        load=_load,
        probe=lambda kernel: cuda_reasons(),
        # A compile per new shape (seconds) and, past the recompile limit, an eager path
        # that materialises the score matrix: no place inside a sampler run's tuning.
        tunable=False,
    ),
)
