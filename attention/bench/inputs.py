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


# Video-like inputs for the sparse benchmark (benchmarks/sparse.py) and the sparse GPU tests.
VIDEO_CHANNELS = 16
VIDEO_CORRELATION = (3, 6, 6)  # frames, rows, columns over which the latent field varies slowly
VIDEO_NOISE = 0.5  # std of independent per-token noise, against a unit-std smooth signal
VIDEO_KEY_ALIGNMENT = 0.5  # std of the part of a head's key projection that its query projection lacks


def video_qkv(batch: int, heads: int, head_dim: int, grid: tuple[int, int, int], device: torch.device,
              dtype: torch.dtype, *, text_tokens: int = 0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v in (B, H, N, D) (a view of token-major memory, as ComfyUI's DiTs pass them)
    for N = text_tokens + frames * rows * columns, with video-like locality.

    The input model: a smooth latent field of VIDEO_CHANNELS channels over the (frames,
    rows, columns) grid (a random coarse grid, one point per VIDEO_CORRELATION cell,
    trilinearly upsampled, each channel normalised to unit std), so that tokens near each
    other in space and time carry similar latents. Each head projects the field with a
    random matrix for queries and a correlated one for keys (query projection plus
    VIDEO_KEY_ALIGNMENT noise), and an independent one for values; every token then gets
    independent noise (std VIDEO_NOISE) and q, k, v are rescaled to unit std, as a
    QK-normalised DiT's are. A query's largest scores are thus with keys nearby, yet the
    far keys are many and keep a share of the softmax: the structure sparse kernels
    exploit, without any trained weights behind it. Text tokens (first, as ComfyUI's joint
    attention places them) are plain Gaussian: no locality. No per-channel outliers.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    frames, rows, columns = grid
    coarse = torch.randn(batch, VIDEO_CHANNELS, *(-(-size // cell) + 1 for size, cell in zip(grid, VIDEO_CORRELATION)),
                         device=device, generator=generator)
    field = torch.nn.functional.interpolate(coarse, size=grid, mode="trilinear", align_corners=True)
    field = field.flatten(2).transpose(1, 2)  # (B, frames * rows * columns, C)
    field = (field - field.mean(dim=1, keepdim=True)) / field.std(dim=1, keepdim=True)

    def projection() -> torch.Tensor:
        return torch.randn(heads, VIDEO_CHANNELS, head_dim, device=device, generator=generator) / VIDEO_CHANNELS ** 0.5

    query_projection = projection()
    key_projection = (query_projection + VIDEO_KEY_ALIGNMENT * projection()) / (1 + VIDEO_KEY_ALIGNMENT ** 2) ** 0.5
    tokens = text_tokens + field.shape[1]

    def tensor(weights: torch.Tensor) -> torch.Tensor:
        video = torch.einsum("bnc,hcd->bnhd", field, weights)
        video = (video + VIDEO_NOISE * torch.randn(video.shape, device=device, generator=generator)) \
            / (1 + VIDEO_NOISE ** 2) ** 0.5
        out = torch.empty(batch, tokens, heads, head_dim, device=device, dtype=dtype)
        out[:, text_tokens:] = video.to(dtype)
        if text_tokens:
            out[:, :text_tokens] = torch.randn(batch, text_tokens, heads, head_dim, device=device,
                                               generator=generator).to(dtype)
        return out.transpose(1, 2)

    return tensor(query_projection), tensor(key_projection), tensor(projection())
