"""comfy-kitchen's INT8 attention (`comfy_kitchen.int8_attention`).

Already a ComfyUI requirement. (B, H, N, D) with a contiguous last dim, head dim up to
256 (padded to 64/128/256 inside), bool or additive masks broadcastable to
(B, H, Nq, Nk), grouped-query attention, sm75 and newer. It imports `packaging`
without declaring it, so a missing `packaging` is reported with its fix.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..backend import BHND, Backend, Kernel, Package
from ..call import MASK_ADDITIVE, MASK_BOOL, MASK_INTEGER
from ..constraints import ComputeCapability, DeviceTypes, DTypes, Exactness, HeadDims, KeyHeads, Masks
from ..probes import cuda_probe


def import_comfy_kitchen() -> ModuleType:
    """comfy_kitchen, or an ImportError that says how to fix a missing `packaging`."""
    try:
        import comfy_kitchen
    except ModuleNotFoundError as error:
        if error.name == "packaging":
            raise ImportError("comfy-kitchen needs 'packaging', which it does not declare: pip install packaging") \
                from error
        raise
    return comfy_kitchen


def _load() -> Kernel:
    comfy_kitchen = import_comfy_kitchen()
    function = getattr(comfy_kitchen, "int8_attention", None)
    if function is None:
        raise ImportError("this comfy-kitchen has no int8_attention: pip install -U comfy-kitchen")

    def kernel(q, k, v, mask, scale, layout):
        return function(q, k, v, scale=scale, attn_mask=mask)
    return kernel


BACKENDS = (
    Backend(
        name="kitchen_int8",
        family="kitchen",
        description="comfy-kitchen INT8 attention (Hadamard-rotated INT8 Q/K/V)",
        quantized=True,
        layouts=(BHND,),
        constraints=(
            DeviceTypes(frozenset({"cuda"})),
            ComputeCapability((7, 5)),
            DTypes(frozenset({torch.float16, torch.bfloat16, torch.float32})),
            HeadDims(maximum=256, equal_v=True),
            Masks(frozenset({MASK_BOOL, MASK_ADDITIVE, MASK_INTEGER})),
            KeyHeads(gqa=True),
            Exactness(quantized=True),
        ),
        load=_load,
        package=Package("comfy_kitchen", "comfy-kitchen", None, "pip install -U comfy-kitchen"),
        probe=cuda_probe(BHND, (7, 5), mask=True),
    ),
)
