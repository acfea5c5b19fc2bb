"""Sparse attention: comfy-kitchen's Sol-Attn (`sol`) and SpargeAttention (`sparge`).

Both skip most key blocks, so both are approximations whatever their precision: they
are never in `auto`'s table, never measured by `auto_tuned` (`tunable=False`), and run
only where a user names them; the Attention Backend (Sparse) node adds the step window,
block filters and a quality monitor (attention.quality). Their knobs are per node
(attention.sparsity), bound to the adapter once per call signature (`configure`).

Per-call rules, from the packages' own checks:
- no masks: `sol_attn` takes only a per-key bias honoured by its exact branch, and
  SpargeAttention's `attn_mask` argument is ignored;
- self-attention only: `sol_attn` sizes everything from q (k and v must have q's shape,
  so no cross-attention and no GQA); SpargeAttention selects blocks for self-attention;
- at least MIN_TOKENS tokens: comfy-kitchen's docstring puts the break-even against
  dense or fused attention at "roughly 12k tokens", and core ComfyUI's node keeps
  shorter calls dense by default (12288); SpargeAttention's own floor is 128 tokens and
  its break-even was not measured here, so it shares the floor;
- `sol`: (B, T, H, 128) bf16/fp16, a contiguous last dim and 16-byte aligned strides
  (ComfyUI's views are), sm80+; an INT8 kernel inside, so precision requests go dense.
- `sparge` (`spas_sage2_attn_meansim_topk_cuda`, SpargeAttn bfd980b): head dim 64 or
  128 (its assert), q and k with the same head count (its block map is built per q head
  from k's pooled blocks: no GQA), at least 128 query tokens (its assert); built for
  sm80/86/87/89/90 only (its setup.py; sm90 compiles as sm_90a). Its wrapper ignores
  `attn_mask`, `dropout_p` and `output_dtype`, copies q, k and v to contiguous tensors
  (fp32/fp16 inputs become fp16, bf16 stays bf16 for q and k, v always fp16), returns a
  tensor of q's converted dtype (so of ours: fp16/bf16 only), in NHD layout a view
  (B, N, H, D) of an HND buffer, and calls `torch.cuda.set_device` on v's device. INT8
  Q·K per block, FP8 P·V (sm89/sm90) or FP16 (sm80); on sm90 the kernel is non-causal
  whatever `is_causal` says (only the block map honours it; we never ask). Needs
  triton and einops at import.
"""

from __future__ import annotations

import functools
import importlib

import torch

from ..backend import BHND, BNHD, Backend, Kernel, Package
from ..call import CallSignature
from ..constraints import (ComputeCapability, DeviceTypes, DTypes, Exactness, HeadDims, KeyHeads, MinTokens, NoMask,
                           SequenceLengths)
from ..probes import cuda_reasons, self_test, suitable_device
from ..sparsity import SolSettings, SpargeSettings
from .kitchen import import_comfy_kitchen

MIN_TOKENS = 12288

_HALF = frozenset({torch.float16, torch.bfloat16})
_COMMON = (DeviceTypes(frozenset({"cuda"})), DTypes(_HALF), NoMask(), KeyHeads(gqa=False),
           SequenceLengths(cross=False), MinTokens(MIN_TOKENS), Exactness(quantized=True))
_TENSOR_LAYOUT = {BHND: "HND", BNHD: "NHD"}


def _bind(kernel: Kernel, settings, call: CallSignature) -> Kernel:
    """The adapter for calls shaped like `call`, with the node's settings bound."""
    arguments = settings.kernel_arguments(call.seq_k)

    def run(q, k, v, mask, scale, layout):
        return kernel(q, k, v, mask, scale, layout, **arguments)
    return run


def _load_sol() -> Kernel:
    kitchen = import_comfy_kitchen()
    function = getattr(kitchen, "sol_attn", None)
    if function is None or not hasattr(kitchen, "sol_attn_is_available"):
        raise ImportError("this comfy-kitchen has no sol_attn (0.2.40 has it): pip install -U comfy-kitchen")

    def kernel(q, k, v, mask, scale, layout, **arguments):
        return function(q, k, v, scale=scale, **arguments)
    return kernel


def _probe_sol(kernel: Kernel) -> list[str]:
    reasons = cuda_reasons((8, 0))
    if reasons:
        return reasons
    device = suitable_device((8, 0))
    if not import_comfy_kitchen().sol_attn_is_available(device):
        return [f"comfy-kitchen has no compiled sol_attn kernel for {torch.cuda.get_device_name(device)} "
                "(its CUDA extension did not load here)"]
    # 128 tokens are two 64-token blocks, both inside sol's always-exact diagonal band.
    return self_test(kernel, BNHD, device, head_dim=128)


def _load_sparge() -> Kernel:
    module = importlib.import_module("spas_sage_attn")
    function = getattr(module, "spas_sage2_attn_meansim_topk_cuda", None)
    if function is None:
        raise ImportError("this spas_sage_attn has no spas_sage2_attn_meansim_topk_cuda: build a current "
                          "SpargeAttention from source")

    def kernel(q, k, v, mask, scale, layout, **arguments):
        return function(q, k, v, is_causal=False, scale=scale, tensor_layout=_TENSOR_LAYOUT[layout], **arguments)
    return kernel


def _probe_sparge(kernel: Kernel) -> list[str]:
    reasons = cuda_reasons((8, 0))
    if reasons:
        return reasons
    # Every key block kept: the self-test checks the kernel, not a sparsity setting.
    return self_test(functools.partial(kernel, topk=1.0), BHND, suitable_device((8, 0)), head_dim=64)


BACKENDS = (
    Backend(
        name="sol",
        family="sparse",
        description="comfy-kitchen Sol-Attn sparse attention (routed 64-token key blocks exact, the rest pooled; "
                    "INT8 inside)",
        quantized=True,
        layouts=(BNHD,),
        constraints=_COMMON + (ComputeCapability((8, 0)), HeadDims(allowed=frozenset({128}), equal_v=True)),
        load=_load_sol,
        package=Package("comfy_kitchen", "comfy-kitchen", "0.2.40", "pip install -U comfy-kitchen"),
        probe=_probe_sol,
        tunable=False,
        sparse=True,
        configure=_bind,
        default_settings=SolSettings(),
    ),
    Backend(
        name="sparge",
        family="sparse",
        description="SpargeAttention sparse attention (top-k or score-mass key blocks, INT8 Q·K, FP8/FP16 P·V)",
        quantized=True,
        layouts=(BHND, BNHD),
        constraints=_COMMON + (ComputeCapability((8, 0), (9, 0)), HeadDims(allowed=frozenset({64, 128}), equal_v=True)),
        load=_load_sparge,
        package=Package("spas_sage_attn", "spas_sage_attn", None,
                        "SpargeAttention is built from source: see the README's 'Sparse attention'"),
        probe=_probe_sparge,
        copies="its wrapper copies q, k and v to contiguous tensors (v in fp16) before quantizing them",
        tunable=False,
        sparse=True,
        configure=_bind,
        default_settings=SpargeSettings(),
    ),
)
