"""Attention calls of real models at their usual resolutions (DESIGN §3 Shapes,
shared/reference/h200-kernels-2026-11.md). Used by the benchmark, by `doctor` and the
status route to show what `auto` picks for typical shapes, and by tests.

B includes the CFG batch where ComfyUI batches cond and uncond.
"""

from __future__ import annotations

import dataclasses

import torch

from .call import FLAT, HEADS_FIRST, CallSignature


@dataclasses.dataclass(frozen=True)
class ModelShape:
    key: str
    label: str
    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int
    # ComfyUI's form for this model's call: UNets pass (B, N, H*D), DiTs mostly (B, H, N, D).
    layout: str = HEADS_FIRST

    def signature(self, device_type: str = "cuda", capability: tuple[int, int] | None = (9, 0),
                  dtype: torch.dtype = torch.bfloat16) -> CallSignature:
        return CallSignature(
            device_type=device_type, compute_capability=capability if device_type == "cuda" else None,
            dtype=dtype, batch=self.batch, heads_q=self.heads, heads_kv=self.heads, seq_q=self.seq_q,
            seq_k=self.seq_k, head_dim=self.head_dim, head_dim_v=self.head_dim, layout_in=self.layout,
            layout_out=self.layout)

    @property
    def flops(self) -> float:
        """Multiply-adds of Q·Kᵀ and P·V counted as 2 FLOPs each: 4·B·H·Nq·Nk·D."""
        return 4.0 * self.batch * self.heads * self.seq_q * self.seq_k * self.head_dim


MODEL_SHAPES: tuple[ModelShape, ...] = (
    ModelShape("sd15_l1", "SD1.5 level 1", 2, 8, 4096, 4096, 40, FLAT),
    ModelShape("sd15_l2", "SD1.5 level 2", 2, 8, 1024, 1024, 80, FLAT),
    ModelShape("sd15_l3", "SD1.5 level 3", 2, 8, 256, 256, 160, FLAT),
    ModelShape("sdxl_l1", "SDXL level 1", 2, 10, 4096, 4096, 64, FLAT),
    ModelShape("sdxl_l2", "SDXL level 2", 2, 20, 1024, 1024, 64, FLAT),
    ModelShape("sdxl_cross", "SDXL cross-attn", 2, 20, 1024, 77, 64, FLAT),
    ModelShape("flux_1024", "Flux 1024²", 1, 24, 4608, 4608, 128),
    ModelShape("qwen_1328", "Qwen-Image 1328²", 2, 24, 6989, 6989, 128),
    ModelShape("wan_480p", "Wan 2.1 14B 480p 81f", 2, 40, 32760, 32760, 128),
    ModelShape("wan_720p", "Wan 2.1 14B 720p 81f", 1, 40, 75600, 75600, 128),
    ModelShape("hunyuan_720p", "HunyuanVideo 720p 129f", 1, 24, 119056, 119056, 128),
)

# Small enough for `bench --quick` and for showing `auto` in the UI.
QUICK_KEYS = ("sd15_l1", "sdxl_l2", "sdxl_cross", "flux_1024", "qwen_1328")


def by_key(key: str) -> ModelShape:
    for shape in MODEL_SHAPES:
        if shape.key == key:
            return shape
    raise KeyError(f"unknown model shape {key!r}; known: {', '.join(s.key for s in MODEL_SHAPES)}")
