"""Realistic attention inputs: token-major memory like ComfyUI's activations, with the
per-channel outliers real K and V carry (they are what breaks naive INT8/FP8
quantization; zeros or plain Gaussians would flatter every quantized kernel)."""

from __future__ import annotations

from typing import Optional

import torch

from ..call import FLAT
from ..shapes import ModelShape

K_OUTLIER_SCALE = 4.0
V_OUTLIER_SCALE = 2.0
OUTLIER_CHANNELS = 4


def _token_major(shape: ModelShape, n: int, device: torch.device, dtype: torch.dtype,
                 generator: torch.Generator, outlier_scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(shape.batch, n, shape.heads, shape.head_dim, device=device, dtype=torch.float32,
                    generator=generator)
    if outlier_scale != 1.0:
        channels = torch.randperm(shape.head_dim, generator=generator, device=device)[:OUTLIER_CHANNELS]
        t[..., channels] *= outlier_scale
        t[..., channels] += outlier_scale  # a channel offset too, as in real K
    return t.to(dtype)


def call_form(shape: ModelShape) -> dict[str, bool]:
    """The layout keywords ComfyUI passes with this model's call (output in the input's form)."""
    heads_first = shape.layout != FLAT
    return {"skip_reshape": heads_first, "skip_output_reshape": heads_first}


def make_qkv(shape: ModelShape, device: torch.device, dtype: torch.dtype,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v in the model's ComfyUI call form (`shape.layout`), token-major memory."""
    generator = torch.Generator(device=device).manual_seed(seed)
    q = _token_major(shape, shape.seq_q, device, dtype, generator)
    k = _token_major(shape, shape.seq_k, device, dtype, generator, K_OUTLIER_SCALE)
    v = _token_major(shape, shape.seq_k, device, dtype, generator, V_OUTLIER_SCALE)
    if shape.layout == FLAT:
        return tuple(t.flatten(2) for t in (q, k, v))
    return tuple(t.transpose(1, 2) for t in (q, k, v))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape,
              rows: Optional[int] = 2048) -> torch.Tensor:
    """fp32 attention on the first `rows` queries, (B, H, rows, D)."""
    def bhnd(t: torch.Tensor) -> torch.Tensor:
        if shape.layout == FLAT:
            t = t.view(t.shape[0], t.shape[1], shape.heads, -1).transpose(1, 2)
        return t.float()
    qf, kf, vf = bhnd(q), bhnd(k), bhnd(v)
    if rows is not None:
        qf = qf[:, :, :rows]
    return torch.nn.functional.scaled_dot_product_attention(qf, kf, vf)


def as_bhnd(out: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    if shape.layout == FLAT:
        return out.view(out.shape[0], out.shape[1], shape.heads, -1).transpose(1, 2)
    return out
