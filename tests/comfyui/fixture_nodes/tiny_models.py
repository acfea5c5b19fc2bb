"""Weightless tiny real ComfyUI models (Flux, SD1.5 UNet, HunyuanVideo, Lumina2) that
sample on a CPU in well under a second: real model code, real sampler, real patcher,
random weights.

Import only after ComfyUI is on sys.path and `comfy.cli_args.args.cpu` is set.
Works with ComfyUI 0.3.64, 0.8.0, 0.19.3 and 0.28.0: configs follow the parameters of the
tree they run in (FluxParams, HunyuanVideoParams, NextDiT's arguments).
"""

from __future__ import annotations

import dataclasses
import inspect
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


def hunyuan_video_config() -> dict:
    """A shrunken HunyuanVideo: 2 heads of dim 128, one double and one single block, the
    two-block token refiner (its self-attention takes the text mask with padded queries)."""
    import comfy.ldm.hunyuan_video.model as hunyuan_model
    fields = {field.name for field in dataclasses.fields(hunyuan_model.HunyuanVideoParams)}
    config = {
        "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
        "context_in_dim": 64, "hidden_size": 256, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
        "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 256, "patch_size": [1, 2, 2],
        "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False,
    }
    newer = {"use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False}  # 0.8.0 and newer
    config.update({name: value for name, value in newer.items() if name in fields})
    return config


def lumina2_config() -> dict:
    """A shrunken Lumina 2: 2 query heads of dim 96 over 1 key head (repeated before
    attention, as the model does), one refiner block of each kind and one main layer."""
    import comfy.ldm.lumina.model as lumina_model
    accepted = inspect.signature(lumina_model.NextDiT.__init__).parameters
    config = {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 192, "n_layers": 1,
        "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": 2.0,
        "qk_norm": True, "cap_feat_dim": 64, "axes_dims": [32, 32, 32], "axes_lens": [300, 512, 512],
        "rope_theta": 10000.0,  # 0.8.0 and newer
    }
    return {name: value for name, value in config.items() if name in accepted}


def tiny_hunyuan_video(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    geometry = dict(channels=16, frames=2, h=8, w=8, ctx_len=16, ctx_dim=64, pooled_dim=32, guidance=6.0)
    return _patcher(comfy.supported_models.HunyuanVideo(hunyuan_video_config()), seed, geometry)


def tiny_lumina2(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    geometry = dict(channels=16, h=8, w=8, ctx_len=12, ctx_dim=64, pooled_dim=None, guidance=None)
    return _patcher(comfy.supported_models.Lumina2(lumina2_config()), seed, geometry)


def text_mask(lengths: list[int], seq: int) -> torch.Tensor:
    """A text encoder's attention mask (long, 1 = token, 0 = padding), one row per prompt."""
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return mask


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


def _conditioning(geometry: dict, seed: int, batch: int, masks: tuple = (None, None)) -> tuple[list, list]:
    """(positive, negative); `masks` adds an `attention_mask` to either, as text encoders
    that return masks (HunyuanVideo's, Lumina2's) do."""
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)

    def one(mask: Optional[torch.Tensor]) -> list:
        context = torch.randn((batch, geometry["ctx_len"], geometry["ctx_dim"]), generator=generator)
        extra = {}
        if geometry["pooled_dim"] is not None:
            extra["pooled_output"] = torch.randn((batch, geometry["pooled_dim"]), generator=generator)
        if geometry["guidance"] is not None:
            extra["guidance"] = geometry["guidance"]
        if mask is not None:
            extra["attention_mask"] = mask
        return [[context, extra]]

    return one(masks[0]), one(masks[1])


def sample(model: comfy.model_patcher.ModelPatcher, seed: int = 0, steps: int = 2, cfg: float = 2.0,
           sampler_name: str = "euler", scheduler: str = "normal",
           latent: Optional[torch.Tensor] = None, masks: tuple = (None, None)) -> torch.Tensor:
    """Sample through comfy.sample.sample (the KSampler path); returns the latent.
    `masks`: (positive, negative) text attention masks, or None for either."""
    geometry = _GEOMETRY[id(model.model)]
    if latent is None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        frames = (geometry["frames"],) if "frames" in geometry else ()
        latent = torch.randn((1, geometry["channels"]) + frames + (geometry["h"], geometry["w"]), generator=generator)
    positive, negative = _conditioning(geometry, seed, latent.shape[0], masks)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                   denoise=1.0, disable_pbar=True, seed=seed)
