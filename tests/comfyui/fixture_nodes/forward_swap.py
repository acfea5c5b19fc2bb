"""A pack that swaps attention layers' `forward` for the length of a sampler run, the way
ComfyUI-NAG does: a CFGGuider subclass sets the forwards, samples, and puts the class's
forward back in a `finally`. The replacement calls ComfyUI's attention without
`transformer_options`, so those calls never reach an attention override.

Import only after ComfyUI is on sys.path (tiny_models' rule).
"""

from __future__ import annotations

from types import MethodType
from typing import Callable, Optional

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
from comfy.ldm.modules import attention as comfy_attention

import tiny_models


def cross_attention_without_options(self, x, context=None, value=None, mask=None, transformer_options=None,
                                    **kwargs):
    """CrossAttention's computation, calling ComfyUI's attention as a forward-replacing pack does."""
    context = x if context is None else context
    q, k = self.to_q(x), self.to_k(context)
    v = self.to_v(context if value is None else value)
    out = comfy_attention.optimized_attention(q, k, v, self.heads, attn_precision=self.attn_precision)
    return self.to_out(out)


def forward_without_options(self, *args, **kwargs):
    """The layer's own forward with the options dropped (a pack that copied the model's forwards)."""
    kwargs["transformer_options"] = {}
    return type(self).forward(self, *args, **kwargs)


def cross_attention_layers(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's cross-attention layers (`attn2`), the ones NAG replaces."""
    return [module for name, module in diffusion_model.named_modules()
            if name.endswith("attn2") and isinstance(module, comfy_attention.CrossAttention)]


def flux_blocks(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks)


class SwappingGuider(comfy.samplers.CFGGuider):
    """CFGGuider whose run has `replacement` as the forward of `layers(diffusion_model)`."""

    def __init__(self, model_patcher, layers: Callable[[torch.nn.Module], list], replacement: Callable) -> None:
        super().__init__(model_patcher)
        self.layers = layers
        self.replacement = replacement

    def sample(self, *args, **kwargs):
        swapped = self.layers(self.model_patcher.model.diffusion_model)
        for module in swapped:
            module.forward = MethodType(self.replacement, module)
        try:
            return super().sample(*args, **kwargs)
        finally:
            for module in swapped:
                del module.forward  # back to the class's forward


def sample_swapped(model, layers: Callable[[torch.nn.Module], list], replacement: Callable, seed: int = 0,
                   steps: int = 2, cfg: float = 2.0, latent: Optional[torch.Tensor] = None) -> torch.Tensor:
    """tiny_models.sample through SwappingGuider (KSampler's path with the guider replaced)."""
    geometry = tiny_models._GEOMETRY[id(model.model)]
    if latent is None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latent = torch.randn((1, geometry["channels"], geometry["h"], geometry["w"]), generator=generator)
    positive, negative = tiny_models._conditioning(geometry, seed, latent.shape[0])
    noise = comfy.sample.prepare_noise(latent, seed)
    ksampler = comfy.samplers.KSampler(model, steps=steps, device=comfy.model_management.get_torch_device(),
                                       sampler="euler", scheduler="normal", denoise=1.0,
                                       model_options=model.model_options)
    guider = SwappingGuider(model, layers, replacement)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), ksampler.sigmas,
                             disable_pbar=True, seed=seed)
