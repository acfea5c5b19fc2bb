"""What an attention call looks like, independent of the tensors that carry it.

A `CallSignature` is everything a backend's constraints and the `auto` rules may look
at. It is built once per distinct call (the dispatcher caches decisions by a cheaper
key) and can be written by hand, which is how the CPU tests exercise GPU-only
backends without a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

# ComfyUI's two call forms (DESIGN §3): skip_reshape=False passes (B, N, H*D),
# skip_reshape=True passes (B, H, N, D). The output form follows skip_output_reshape.
FLAT = "B,N,H*D"
HEADS_FIRST = "B,H,N,D"

# Mask kinds a backend can declare support for.
MASK_NONE = "none"
MASK_BOOL = "bool"
MASK_ADDITIVE = "additive"
MASK_INTEGER = "integer"  # e.g. a long padding mask: nonzero means attend


def mask_kind(mask: Optional[torch.Tensor]) -> str:
    """Classify a mask the way backends declare what they accept."""
    if mask is None:
        return MASK_NONE
    if mask.dtype == torch.bool:
        return MASK_BOOL
    if mask.dtype.is_floating_point:
        return MASK_ADDITIVE
    return MASK_INTEGER


def canonical_mask_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The 4-D shape ComfyUI's `attention_pytorch` broadcasts a mask to.

    2-D (Nq, Nk) gains batch and head dims, 3-D (B, Nq, Nk) gains a head dim.
    """
    if len(shape) == 2:
        return (1, 1) + tuple(shape)
    if len(shape) == 3:
        return (shape[0], 1) + tuple(shape[1:])
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class CallSignature:
    """One attention call described by shapes, dtypes, device and the model's requests.

    `compute_capability` is None off CUDA. `attn_precision` is the dtype the model asked
    softmax to accumulate in (None: no request). `low_precision_ok` is False when the
    model asked not to be quantized (`low_precision_attention=False`). `custom_scale`
    is True when the call passes its own softmax scale.
    """

    device_type: str
    compute_capability: Optional[tuple[int, int]]
    dtype: torch.dtype
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    head_dim_v: int
    mask_kind: str = MASK_NONE
    mask_shape: Optional[tuple[int, ...]] = None
    layout_in: str = FLAT
    layout_out: str = FLAT
    attn_precision: Optional[torch.dtype] = None
    low_precision_ok: bool = True
    custom_scale: bool = False

    @property
    def is_cross_attention(self) -> bool:
        return self.seq_q != self.seq_k

    @property
    def is_gqa(self) -> bool:
        return self.heads_q != self.heads_kv

    @property
    def wants_exact(self) -> bool:
        """The model asked for full precision: no quantized kernel may serve this call."""
        return not self.low_precision_ok or self.attn_precision == torch.float32

    def describe(self) -> str:
        """A short human-readable form for logs, reports and errors."""
        cc = "" if self.compute_capability is None else " sm%d%d" % self.compute_capability
        mask = "" if self.mask_kind == MASK_NONE else f" mask={self.mask_kind}{list(self.mask_shape or ())}"
        heads = f"{self.heads_q}" if not self.is_gqa else f"{self.heads_q}/{self.heads_kv}kv"
        dtype = str(self.dtype).replace("torch.", "")
        return (f"B={self.batch} H={heads} Nq={self.seq_q} Nk={self.seq_k} D={self.head_dim} "
                f"{dtype} {self.device_type}{cc}{mask}")


_capability_cache: dict[torch.device, Optional[tuple[int, int]]] = {}


def device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """Compute capability of a CUDA device, cached; None for other devices."""
    try:
        return _capability_cache[device]
    except KeyError:
        cc = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
        _capability_cache[device] = cc
        return cc


def describe_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: Optional[torch.Tensor] = None,
    *,
    skip_reshape: bool = False,
    skip_output_reshape: bool = False,
    attn_precision: Optional[torch.dtype] = None,
    low_precision_ok: bool = True,
    custom_scale: bool = False,
) -> CallSignature:
    """Describe a call made in one of ComfyUI's forms (DESIGN §3)."""
    if skip_reshape:
        batch, heads_q, seq_q, head_dim = q.shape
        _, heads_kv, seq_k, _ = k.shape
        head_dim_v = v.shape[-1]
    else:
        batch, seq_q, width = q.shape
        heads_q = heads
        head_dim = width // heads
        seq_k = k.shape[1]
        heads_kv = k.shape[-1] // head_dim
        head_dim_v = v.shape[-1] // heads_kv
    return CallSignature(
        device_type=q.device.type,
        compute_capability=device_capability(q.device),
        dtype=q.dtype,
        batch=batch,
        heads_q=heads_q,
        heads_kv=heads_kv,
        seq_q=seq_q,
        seq_k=seq_k,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        mask_kind=mask_kind(mask),
        mask_shape=None if mask is None else tuple(mask.shape),
        layout_in=HEADS_FIRST if skip_reshape else FLAT,
        layout_out=HEADS_FIRST if skip_output_reshape else FLAT,
        attn_precision=attn_precision,
        low_precision_ok=low_precision_ok,
        custom_scale=custom_scale,
    )
