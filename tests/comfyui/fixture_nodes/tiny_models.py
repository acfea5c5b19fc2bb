"""Weightless tiny real ComfyUI models (Flux, SD1.5 UNet) that sample on a CPU in well
under a second: real model code, real sampler, real patcher, random weights.

Import only after ComfyUI is on sys.path and `comfy.cli_args.args.cpu` is set.
Works with ComfyUI 0.3.64, 0.8.0 and 0.19.3 (the Flux config follows the FluxParams
fields of the tree it runs in).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.supported_models

# Sampling geometry per model (latent channels and size, text context), by id of the
# shared BaseModel so that clones of a patcher find it too.
_GEOMETRY: dict[int, dict] = {}


def _init_parameters(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    # ComfyUI's ops skip torch's own initialisation: without this the weights are
    # whatever memory held.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * std
            if parameter.ndim == 1 and ("norm" in name or name.endswith(".scale")):
                noise = noise + 1.0  # norm gains around 1
            parameter.copy_(noise.to(parameter.dtype))


def _patcher(model_config, seed: int, geometry: dict) -> comfy.model_patcher.ModelPatcher:
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}).to(torch.float32)
    _init_parameters(model.diffusion_model, seed)
    model.eval()
    _GEOMETRY[id(model)] = geometry
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def flux_config() -> dict:
    """A shrunken Flux-dev config: 2 heads of dim 128, one double and one single block."""
    import comfy.ldm.flux.model as flux_model
    fields = {field.name for field in dataclasses.fields(flux_model.FluxParams)}
    config = {
        "image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
        "patch_size": 2, "vec_in_dim": 32, "context_in_dim": 64, "hidden_size": 256, "mlp_ratio": 2.0,
        "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000,
        "qkv_bias": True,
    }
    if "txt_ids_dims" in fields:  # 0.8.0 and newer: required, no default
        config["txt_ids_dims"] = []
    return config


def sd_unet_config() -> dict:
    """A shrunken SD1.5 UNet: attention at two levels, self- and cross-attention."""
    return {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
        "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1],
        "use_spatial_transformer": True, "legacy": False, "use_linear_in_transformer": False,
        "context_dim": 32, "adm_in_channels": None, "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def tiny_flux(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    geometry = dict(channels=16, h=8, w=8, ctx_len=8, ctx_dim=64, pooled_dim=32, guidance=3.5)
    return _patcher(comfy.supported_models.Flux(flux_config()), seed, geometry)


def tiny_sd_unet(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    model_config = comfy.supported_models.SD15(sd_unet_config())
    # SD15's own extra config asks for 8 heads of 40+; shrink to 2 heads.
    model_config.unet_config["num_heads"] = 2
    model_config.unet_config["num_head_channels"] = -1
    geometry = dict(channels=4, h=16, w=16, ctx_len=8, ctx_dim=32, pooled_dim=32, guidance=None)
    return _patcher(model_config, seed, geometry)


def tiny_unet_without_attention(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """The tiny SD1.5 UNet with no transformer at any level: a model without attention layers."""
    config = sd_unet_config()
    config.update(transformer_depth=[0, 0], transformer_depth_middle=-1, transformer_depth_output=[0, 0, 0, 0])
    model_config = comfy.supported_models.SD15(config)
    model_config.unet_config["num_heads"] = 2
    model_config.unet_config["num_head_channels"] = -1
    geometry = dict(channels=4, h=16, w=16, ctx_len=8, ctx_dim=32, pooled_dim=32, guidance=None)
    return _patcher(model_config, seed, geometry)


def flux_conditioning(seed: int, batch: int = 1) -> tuple[list, list]:
    """(positive, negative) CONDITIONING for tiny_flux."""
    return _conditioning(dict(ctx_len=8, ctx_dim=64, pooled_dim=32, guidance=3.5), seed, batch)


def _conditioning(geometry: dict, seed: int, batch: int) -> tuple[list, list]:
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)

    def one() -> list:
        context = torch.randn((batch, geometry["ctx_len"], geometry["ctx_dim"]), generator=generator)
        extra = {"pooled_output": torch.randn((batch, geometry["pooled_dim"]), generator=generator)}
        if geometry["guidance"] is not None:
            extra["guidance"] = geometry["guidance"]
        return [[context, extra]]

    return one(), one()


def sample(model: comfy.model_patcher.ModelPatcher, seed: int = 0, steps: int = 2, cfg: float = 2.0,
           sampler_name: str = "euler", scheduler: str = "normal",
           latent: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sample through comfy.sample.sample (the KSampler path); returns the latent."""
    geometry = _GEOMETRY[id(model.model)]
    if latent is None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latent = torch.randn((1, geometry["channels"], geometry["h"], geometry["w"]), generator=generator)
    positive, negative = _conditioning(geometry, seed, latent.shape[0])
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                   denoise=1.0, disable_pbar=True, seed=seed)
