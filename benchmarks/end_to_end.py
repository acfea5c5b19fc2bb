"""Sampler step time through real ComfyUI model classes (issue 4, item 3).

ComfyUI's own model classes at their real configurations with random weights (fewer
transformer blocks for Flux and Wan; each block keeps its real shapes), sampled through
`comfy.sample.sample` (the KSampler path: real sampler, patcher and attention override)
for ComfyUI's default attention (the MODEL unpatched), every requested backend through
the pack's node logic, and the node's automatic selections (`auto`, `auto_tuned`):

    model      class (comfy.supported_models)  latent (batch 1)     text       cfg  attention calls
    flux       Flux (dev: 3072 wide, 24x128)  16x128x128 (1024^2)  512x4096   1.0  4096 + 512 tokens, B=1
    wan        WAN21_T2V (14B: 5120, 40x128)  16x21x60x104 (480p,  512x4096   6.0  32760 tokens, B=2
                                               81 frames)
    sdxl       SDXL (full UNet)               4x128x128 (1024^2)   77x2048    7.0  4096 / 1024 tokens, B=2

cfg is what workflows use (Flux dev is guidance-distilled: cfg 1 and no uncond batch);
ComfyUI batches cond and uncond together, so the other two run attention at B=2. The
weight dtype is what ComfyUI picks when it loads the released checkpoint on this device
(`comfy.model_management.unet_dtype`; on an H200: bf16 Flux, fp16 Wan and SDXL), or
`--dtype`. `--tiny` runs the same code with tiny widths, one block and small latents in
fp32, so it finishes on a CPU in seconds.

Timing. One warm-up sample per variant, then `--repeats` rounds in which every variant
samples once (round-robin, so drift hits all alike); each sample is timed on the host
with the device synchronised before and after. Reported per variant:
- step ms: median sample time / steps (sampler setup and ComfyUI's switch between MODEL
  clones included, as a workflow pays them once per run);
- steady step ms: median time between consecutive sampler-step callbacks (device marks
  recorded without synchronising), i.e. a step with no per-sample setup;
- speedup: default's time / the variant's, for both.
The default is timed a second time in the same rounds (`default (timed again)`, and
`compiled (timed again)` with --compile): its ratio to the first timing is the noise floor
of the speedup columns; a ratio closer to 1 than that is not a measured difference.

Attention time. One extra sample per variant with an override in the MODEL's
`transformer_options["optimized_attention_override"]` (DESIGN §3) that marks the device
timeline (CUDA events, no synchronisation; the host clock on a CPU) before and after
each attention call and passes the call on unchanged: to ComfyUI's own function for the
default, to the pack's override for the others (it is chained around it). Inside the
measured time: everything between ComfyUI's `wrap_attn` and its return, i.e. ComfyUI's
attention function with its reshapes and output copy for the default; the pack's
dispatch, the views or copies a kernel needs, the kernel and the output view for the
others; self- and cross-attention alike. Outside it: the q/k/v projections, norms and
RoPE, which the model runs before the call and are the same for every variant. From the
default's attention time per step T_a, a variant's T_a' and the default's step time T,
predicted speedup = T / (T - T_a + T_a'), reported beside the measured one and their
ratio (the issue's target: `auto` within 5% of its prediction).

Usage:
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/end_to_end.py [--models flux,wan,sdxl]
        [--backends sdpa,sage,...] [--sparse sol,sparge] [--steps 4] [--repeats 3] [--tiny] [--out DIR]

`--sparse sol` adds a variant patched as the Attention Backend (Sparse) node does with
its defaults: sol's default settings, dense outside 0.2-0.9 of the schedule and in the
first and last block (3 Wan layers: only the middle one is sparse), cross-attention
dense, and the quality monitor sampling (its checks are part of the measured time).
Sparse backends are never in the default list.

Without `--backends`: every backend available here, except `sdpa_math` and `flex` at
full size (the math kernel materialises the score matrix: 40 x 32760^2 per batch
element at Wan 480p; flex recompiles per shape), then the node's automatic selections:
`auto` (always run) and `auto_tuned`, which measures the kernels during its warm-up
sample and saves its decisions under `<out>/comfyui_user` (ComfyUI's user directory
for this run). Backends that cannot run here are listed with their reasons and
skipped. `--time-budget` skips what is left once it is spent and says so in the
results, which are rewritten after every model.

On the H200 device (no network): ComfyUI 0.19.3's tree and the wheels its import path
needs beyond the machine's own packages (av, comfy-aimdo, torchsde, trampoline) travel
with the call, with sageattention 1.0.6; carry `.whl_e2e` and `.comfy_e2e` (36 MiB):

    set -o pipefail; mkdir -p $OUT/e2e /tmp/comfy \\
      && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/e2e .whl_e2e/*.whl \\
      && tar xzf .comfy_e2e/comfyui.tar.gz -C /tmp/comfy \\
      && PYTHONPATH=/tmp/e2e PYTHONUNBUFFERED=1 COMFYUI_PATH=/tmp/comfy/ComfyUI \\
         python3 benchmarks/end_to_end.py --out $OUT/e2e 2>&1 | tee $OUT/e2e/log.txt

comfy-kitchen (for `kitchen_int8`; ComfyUI only logs that it is missing) does not fit
beside av in one call: to add it, first a call carrying `.whl` that runs
`mkdir -p /tmp/stash && cp .whl/comfy_kitchen-*.whl /tmp/stash/`, then, while the
machine is still warm, the command above with `/tmp/stash/*.whl` added to the install.

Preparing the carried folders (here, with network; both are ignored by git):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
      -d .whl_e2e av==18.1.0 comfy-aimdo==0.6.0 torchsde==0.2.6 trampoline==0.1.2 sageattention==1.0.6
    tar czf .comfy_e2e/comfyui.tar.gz -C /path/to/parent --transform 's,^0.19.3,ComfyUI,' \\
      --exclude='0.19.3/.*' --exclude='*_tokenizer' --exclude='__pycache__' --exclude='*.md' --exclude='*.png' \\
      --exclude=0.19.3/{tests,tests-unit,input,output,models,user,temp,custom_nodes,blueprints,script_examples} \\
      --exclude=0.19.3/{comfy_api_nodes,app,api_server,alembic_db,middleware} 0.19.3

(the tree without what its import never reads: tests, web-server parts, the API nodes,
tokenizer vocabularies; about 1 MB).

GPU memory, one model at a time: 4+8 Flux blocks with their embedders (2.55 B
parameters, 5.1 GB bf16), 3 Wan 14B blocks with theirs (1.29 B, 2.6 GB fp16), the SDXL
UNet (2.57 B, 5.1 GB fp16), plus activations (the largest: Wan's FFN, 2 x 32760 x 13824
fp16, 1.8 GB); each model's peak is in the results. `--time-budget` (default 360 s)
keeps a run inside one device call.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from compile_support import InductorGroup, compile_model, dynamo_counts, graph_break_reasons
from overhead import PACK, load_pack

log = logging.getLogger("end_to_end")

DEFAULT = "default"  # the variant name for ComfyUI's own attention (the MODEL unpatched)
# The default timed a second time in the same rounds (last of the eager variants): the
# noise floor of the eager speedup columns.
DEFAULT_AGAIN = "default (timed again)"
COMPILED = "compiled"  # the default through TorchCompileModel; "compiled+NAME" with the node on NAME
# The compiled default timed a second time in the same rounds: the compiled rows' noise floor.
COMPILED_AGAIN = "compiled (timed again)"
SAMPLER = "euler"
SCHEDULER = "normal"

# Not run unless named, at full size: the reasons are printed with the skipped backends.
SLOW_AT_FULL_SIZE = {
    "sdpa_math": "not run unless named at full size: it materialises the attention matrix "
                 "(40 x 32760^2 scores per batch element at Wan 480p)",
    "flex": "not run unless named at full size: it compiles per shape and auto never chooses it",
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model: ComfyUI's model-config class, its unet config and what sampling feeds it."""

    key: str
    title: str
    config_class: str  # the class in comfy.supported_models
    config: dict
    latent: tuple[int, ...]  # (C, H, W) or (C, T, H, W), batch 1
    context: tuple[int, int]  # text tokens, width
    pooled: Optional[int]  # pooled text vector width, where the model takes one
    extra: dict  # further conditioning values (guidance, SDXL's size embedding)
    output_layer: str  # the diffusion model's last projection (see init_parameters)
    cfg: float
    # The released checkpoint, which ComfyUI's loader reads to choose the dtype and the
    # device the model is created on.
    checkpoint_dtype: torch.dtype
    checkpoint_parameters: int


def flux_spec(tiny: bool, double_blocks: int, single_blocks: int) -> ModelSpec:
    import comfy.ldm.flux.model as flux_model

    if tiny:
        config = {"hidden_size": 256, "num_heads": 2, "context_in_dim": 64, "vec_in_dim": 32,
                  "depth": 1, "depth_single_blocks": 1}
        latent, context, pooled = (16, 8, 8), (8, 64), 32
    else:
        # Flux.1 dev as ComfyUI's model detection reads it from the checkpoint.
        config = {"hidden_size": 3072, "num_heads": 24, "context_in_dim": 4096, "vec_in_dim": 768,
                  "depth": double_blocks, "depth_single_blocks": single_blocks}
        latent, context, pooled = (16, 128, 128), (512, 4096), 768
    config.update({"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
                   "patch_size": 2, "mlp_ratio": 4.0, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True})
    if "txt_ids_dims" in {field.name for field in dataclasses.fields(flux_model.FluxParams)}:
        config["txt_ids_dims"] = []  # ComfyUI 0.8.0 and newer: required, no default
    return ModelSpec("flux", "Flux.1 dev 1024²", "Flux", config, latent, context, pooled, {"guidance": 3.5},
                     output_layer="final_layer.linear", cfg=1.0, checkpoint_dtype=torch.bfloat16,
                     checkpoint_parameters=11_900_000_000)


def wan_spec(tiny: bool, layers: int) -> ModelSpec:
    if tiny:
        config = {"dim": 256, "ffn_dim": 512, "num_heads": 2, "num_layers": 1, "text_dim": 64}
        latent, context = (16, 3, 8, 8), (8, 64)
    else:
        # Wan 2.1 14B t2v as ComfyUI's model detection reads it (text_dim keeps its default, 4096).
        config = {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": layers}
        latent, context = (16, 21, 60, 104), (512, 4096)
    config.update({"image_model": "wan2.1", "model_type": "t2v", "in_dim": 16, "out_dim": 16,
                   "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
                   "cross_attn_norm": True, "eps": 1e-6})
    return ModelSpec("wan", "Wan 2.1 14B t2v 480p 81f", "WAN21_T2V", config, latent, context, None, {},
                     output_layer="head.head", cfg=6.0, checkpoint_dtype=torch.bfloat16,
                     checkpoint_parameters=14_300_000_000)


def sdxl_spec(tiny: bool) -> ModelSpec:
    config = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
              "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
              "adm_in_channels": 2816, "use_linear_in_transformer": True, "num_head_channels": 64,
              "use_temporal_attention": False, "use_temporal_resblock": False}
    if tiny:
        config.update({"model_channels": 64, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
                       "transformer_depth": [0, 1], "transformer_depth_middle": 1,
                       "transformer_depth_output": [0, 0, 1, 1], "context_dim": 64})
        latent, context = (4, 16, 16), (8, 64)
    else:
        # The SDXL base UNet, as in ComfyUI's own diffusers-to-unet config table.
        config.update({"model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                       "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                       "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "context_dim": 2048})
        latent, context = (4, 128, 128), (77, 2048)
    pixels = latent[-1] * 8
    # SDXL's size embedding (adm); the pooled CLIP-G vector is 1280 wide whatever the UNet's size.
    extra = {"width": pixels, "height": pixels, "crop_w": 0, "crop_h": 0, "target_width": pixels,
             "target_height": pixels}
    return ModelSpec("sdxl", "SDXL 1024²", "SDXL", config, latent, context, 1280, extra,
                     output_layer="out.2", cfg=7.0, checkpoint_dtype=torch.float16,
                     checkpoint_parameters=2_570_000_000)


class Clock:
    """Marks on the device's timeline: CUDA events recorded without synchronising on a
    GPU, the host clock on a CPU (where the work is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks; on a GPU only after `sync`."""
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# The positional order of ComfyUI's attention functions (DESIGN §3).
_POSITIONAL = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def _call_shape(describe_call: Callable, args: tuple, kwargs: dict) -> str:
    """The call described the way the pack's reports describe it."""
    named = dict(kwargs)
    named.update(zip(_POSITIONAL, args))
    if any(named.get(name) is None for name in _POSITIONAL[:4]):
        return "unrecognised call form"
    return describe_call(named["q"], named["k"], named["v"], named["heads"], named.get("mask"),
                         skip_reshape=named.get("skip_reshape", False),
                         skip_output_reshape=named.get("skip_output_reshape", False)).describe()


def timing_override(clock: Clock, records: list, previous: Optional[Callable], describe_call: Callable) -> Callable:
    """An attention override that marks the timeline around whatever would have run:
    `previous` (the pack's override) or else ComfyUI's function. A closure, as the
    pack's is: ModelPatcher.clone() copies callable objects but keeps functions."""

    def override(func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = clock.mark()
        out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
        end = clock.mark()
        # Described now, after the end mark: keeping q, k, v for later would hold every
        # call's inputs in memory until the sample ends.
        records.append((start, end, _call_shape(describe_call, args, kwargs)))
        return out

    return override


@dataclasses.dataclass
class Variant:
    name: str  # DEFAULT, a backend name, or "auto"
    patcher: Any
    state: Any = None  # the pack's PatchState (None for the default)
    sample_ms: list[float] = dataclasses.field(default_factory=list)
    step_intervals_ms: list[float] = dataclasses.field(default_factory=list)
    attention_ms: Optional[float] = None  # per sample, from the instrumented run
    attention_by_shape: list[dict] = dataclasses.field(default_factory=list)
    output: Optional[torch.Tensor] = None
    tuning: Optional[dict] = None  # auto_tuned's summary of the warm-up, where it measured
    error: Optional[str] = None
    compiled_from: Optional[str] = None  # compiled variants: the eager variant with the same attention
    dynamo: Optional[dict] = None  # compiled variants: graph breaks and frames at warm-up, and after


class Budget:
    """Wall-clock seconds the whole run may take; later work is skipped with a note."""

    def __init__(self, seconds: float, notes: list[str]) -> None:
        self.deadline = time.monotonic() + seconds
        self.notes = notes

    def spent(self, what: str) -> bool:
        if time.monotonic() < self.deadline:
            return False
        self.notes.append(f"time budget spent: skipped {what}")
        log.warning("time budget spent: skipping %s", what)
        return True


def setup_comfyui(path: Path, cpu: bool) -> None:
    """ComfyUI importable; on the CPU when asked (before any comfy module reads its args)."""
    if not (path / "comfy" / "ldm" / "modules" / "attention.py").is_file():
        raise SystemExit(f"COMFYUI_PATH={path} is not a ComfyUI tree")
    sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu


# The output layer's weights are this much smaller than variance-preserving ones.
OUTPUT_GAIN = 0.01


def init_parameters(module: torch.nn.Module, seed: int, output_layer: str) -> None:
    """Random weights that keep activations finite: N(0, 1/fan_in) for matrices and
    kernels (variance-preserving), norm gains around 1, small biases. ComfyUI's ops
    skip torch's own initialisation, so without this the weights are whatever memory held.

    The output layer is scaled by OUTPUT_GAIN: an untrained model's prediction is not
    calibrated, and with unit-size predictions an EPS model's latent grows far beyond
    sigma in the last steps, where the UNet sees it nearly unscaled: SDXL's activations
    grew about fivefold per step (400 after two steps) on the way to fp16's limit.
    Small predictions keep the latent near its noise."""
    generator = None
    output = module.get_submodule(output_layer)
    with torch.no_grad():
        for owner in module.modules():
            is_norm = "Norm" in type(owner).__name__
            for name, parameter in owner.named_parameters(recurse=False):
                if generator is None or generator.device != parameter.device:
                    generator = torch.Generator(device=parameter.device).manual_seed(seed)
                noise = torch.randn(parameter.shape, generator=generator, device=parameter.device)
                if parameter.ndim >= 2:
                    noise *= (parameter[0].numel()) ** -0.5
                elif is_norm and name in ("weight", "scale"):
                    noise = 1.0 + 0.02 * noise
                else:
                    noise *= 0.02
                if owner is output:
                    noise *= OUTPUT_GAIN
                parameter.copy_(noise.to(parameter.dtype))


def build_model(spec: ModelSpec, dtype_choice: str, seed: int, tiny: bool) -> tuple[Any, dict]:
    """A ModelPatcher around ComfyUI's own model class for `spec`, with random weights."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, spec.config_class)(dict(spec.config))
    info: dict[str, Any] = {"config_class": spec.config_class}
    if not tiny:
        # The class ComfyUI itself picks for this config when it loads a checkpoint.
        detected = comfy.model_detection.model_config_from_unet_config(dict(spec.config))
        info["detected_as"] = type(detected).__name__ if detected is not None else None
        if info["detected_as"] != spec.config_class:
            raise RuntimeError(f"ComfyUI detects {spec.key}'s config as {info['detected_as']}, "
                               f"not {spec.config_class}")
    load_device = mm.get_torch_device()
    supported = list(model_config.supported_inference_dtypes)
    if dtype_choice == "comfy":
        dtype = torch.float32 if tiny else mm.unet_dtype(model_params=spec.checkpoint_parameters,
                                                         supported_dtypes=supported,
                                                         weight_dtype=spec.checkpoint_dtype)
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_choice]
    manual_cast = mm.unet_manual_cast(dtype, load_device, supported)
    model_config.set_inference_dtype(dtype, manual_cast)
    # Where ComfyUI's checkpoint loader creates the model: on the GPU when it fits.
    model = model_config.get_model({}, device=mm.unet_inital_load_device(spec.checkpoint_parameters, dtype))
    init_parameters(model.diffusion_model, seed, spec.output_layer)
    model.eval()
    info.update(dtype=_dtype_name(dtype), manual_cast=None if manual_cast is None else _dtype_name(manual_cast),
                parameters=sum(p.numel() for p in model.diffusion_model.parameters()))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                               offload_device=mm.unet_offload_device())
    return patcher, info


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def conditioning(spec: ModelSpec, seed: int) -> tuple[list, list]:
    """(positive, negative) CONDITIONING with random text embeddings of the real shapes."""
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)

    def one() -> list:
        context = torch.randn((1, *spec.context), generator=generator)
        extra = dict(spec.extra)
        if spec.pooled is not None:
            extra["pooled_output"] = torch.randn((1, spec.pooled), generator=generator)
        return [[context, extra]]

    return one(), one()


class Sampler:
    """One model's sampling inputs, fixed for every variant, and a timed sample call."""

    def __init__(self, spec: ModelSpec, steps: int, seed: int, clock: Clock) -> None:
        import comfy.sample

        self.spec, self.steps, self.seed, self.clock = spec, steps, seed, clock
        self.latent = torch.zeros((1, *spec.latent))  # an empty latent, as the workflow's
        self.noise = comfy.sample.prepare_noise(self.latent, seed)
        self.positive, self.negative = conditioning(spec, seed)

    def run(self, patcher: Any, marks: Optional[list] = None) -> torch.Tensor:
        import comfy.sample

        callback = None if marks is None else (lambda step, x0, x, total: marks.append(self.clock.mark()))
        with torch.inference_mode():
            return comfy.sample.sample(patcher, self.noise, self.steps, self.spec.cfg, SAMPLER, SCHEDULER,
                                       self.positive, self.negative, self.latent, denoise=1.0,
                                       disable_pbar=True, seed=self.seed, callback=callback)

    def timed(self, variant: Variant) -> None:
        """One sample: host time with the device synchronised around it, and the time
        between consecutive step callbacks."""
        marks: list = []
        self.clock.sync()
        start = time.perf_counter()
        self.run(variant.patcher, marks)
        self.clock.sync()
        variant.sample_ms.append((time.perf_counter() - start) * 1e3)
        variant.step_intervals_ms.extend(self.clock.elapsed_ms(a, b) for a, b in itertools.pairwise(marks))

    def instrumented(self, variant: Variant, override_key: str, describe_call: Callable) -> None:
        """One sample with every attention call timed (see the module docstring)."""
        records: list = []
        clone = variant.patcher.clone()
        options = clone.model_options.setdefault("transformer_options", {})
        options[override_key] = timing_override(self.clock, records, options.get(override_key), describe_call)
        self.run(clone)
        self.clock.sync()
        by_shape: dict[str, list[float]] = {}
        for start, end, shape in records:
            by_shape.setdefault(shape, []).append(self.clock.elapsed_ms(start, end))
        variant.attention_ms = sum(sum(times) for times in by_shape.values())
        variant.attention_by_shape = [
            {"shape": shape, "calls_per_step": len(times) / self.steps, "ms_per_step": sum(times) / self.steps}
            for shape, times in sorted(by_shape.items(), key=lambda item: -sum(item[1]))]


def sparse_variant(name: str) -> str:
    return f"{name} (sparse node defaults)"


def make_variants(pack: Any, base: Any, backends: list[str], compiled: list[str],
                  sparse: list[str] = ()) -> list[Variant]:
    """The default (the MODEL as loaded) and one clone per backend, patched exactly as
    the Attention Backend node does with on_unsupported='fall back'; with `compiled`,
    the default compiled as TorchCompileModel does (`compiled`) and each named backend
    patched, then compiled (`compiled+NAME`), the node variants sharing one dynamo
    cache (compile_support.py); then one clone per `sparse` backend, patched as the
    Attention Backend (Sparse) node does with its default settings, step window, block
    filters and quality monitor."""
    patch, nodes_sparse = pack.nodes.patch, pack.nodes.sparse

    def patched(name: str, model: Any) -> tuple[Any, Any]:
        priority, strict = patch.resolve_priority([name], patch.FALL_BACK)
        return patch.patch_model(model, priority=priority, strict=strict, selection=name,
                                 node_id=f"end_to_end.{name}", node_type="AttentionBackend")

    variants = [Variant(DEFAULT, base)]
    for name in backends:
        variants.append(Variant(name, *patched(name, base)))
    variants.append(Variant(DEFAULT_AGAIN, base))
    if compiled:
        plain, with_node = InductorGroup("without the node"), InductorGroup("with the node")
        compiled_default = Variant(COMPILED, compile_model(base, plain), compiled_from=DEFAULT)
        variants.append(compiled_default)
        for name in compiled:
            model, state = patched(name, base)
            variants.append(Variant(f"{COMPILED}+{name}", compile_model(model, with_node), state, compiled_from=name))
        # Last in each round, so the node's variants sit between the compiled default's two timings.
        variants.append(Variant(COMPILED_AGAIN, compiled_default.patcher, compiled_from=DEFAULT))
    for name in sparse:
        rules = nodes_sparse.DEFAULT_RULES
        variants.append(Variant(sparse_variant(name), *nodes_sparse.patch_sparse(
            base, backend=name, settings=pack.attention.registry.get(name).default_settings, rules=rules,
            policy=nodes_sparse.policy_for(rules), node_id=f"end_to_end.{name}.sparse")))
    return variants


def run_model(spec: ModelSpec, args: argparse.Namespace, pack: Any, backends: list[str], clock: Clock,
              budget: Budget) -> dict:
    """Build one model, time every variant, and return its results."""
    import comfy.model_management as mm

    result: dict[str, Any] = {"title": spec.title + (" (tiny dims)" if args.tiny else ""), "config": spec.config,
                              "latent": [1, *spec.latent], "context": [1, *spec.context], "pooled": spec.pooled,
                              "conditioning_extra": spec.extra, "cfg": spec.cfg}
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    build_start = time.perf_counter()
    base, info = build_model(spec, args.dtype, args.seed, args.tiny)
    result.update(info)
    result["build_s"] = round(time.perf_counter() - build_start, 2)
    sampler = Sampler(spec, args.steps, args.seed, clock)
    variants = make_variants(pack, base, backends, [] if args.compile is None else args.compile.split(","),
                             args.sparse_backends)
    override_key = pack.nodes.compat.OVERRIDE_KEY
    describe_call = pack.attention.describe_call
    notes: list[str] = []

    def warm_up(variant: Variant) -> None:
        started = time.perf_counter()
        before = dynamo_counts()
        variant.output = sampler.run(variant.patcher)  # kernel loads, compiles, plans, auto_tuned's tuning
        if variant.compiled_from is not None:
            # A second sample: compiled code that changes between runs would show here.
            sampler.run(variant.patcher)
            after = dynamo_counts()
            variant.dynamo = {"warm_up_s": round(time.perf_counter() - started, 1),
                              **{f"{key}_at_warm_up": after[key] - before[key] for key in after}}
        log.info("%s: %s warmed up in %.1f s", spec.key, variant.name, time.perf_counter() - started)
        if variant.state is not None and variant.state.last_report is not None:
            variant.tuning = variant.state.last_report.get("tuning")

    live: list[Variant] = []
    for variant in variants:
        if budget.spent(f"{spec.key}: {variant.name} and later variants"):
            break
        if _attempt(spec.key, variant, warm_up):
            live.append(variant)
        elif variant.name == DEFAULT:
            break
    if not live or live[0].name != DEFAULT:
        notes.append("the default did not run: nothing to compare against")
        live = []
    after_warm_up = dynamo_counts()
    for round_index in range(args.repeats):
        if live and budget.spent(f"{spec.key}: timed rounds {round_index + 1}-{args.repeats}"):
            break
        live = [variant for variant in live if _attempt(spec.key, variant, sampler.timed)]
    result["dynamo_during_timed_rounds"] = {key: value - after_warm_up[key] for key, value in dynamo_counts().items()}
    for variant in live:
        if variant.compiled_from is not None or variant.name == DEFAULT_AGAIN:
            # Compiled: a timing override would be traced into the graph (the eager twin's
            # attention time is used). The default's twin: the default's own is measured.
            continue
        if budget.spent(f"{spec.key}: attention timing of {variant.name} and later variants"):
            break
        _attempt(spec.key, variant, lambda v: sampler.instrumented(v, override_key, describe_call))

    by_name = {variant.name: variant for variant in variants}
    result["variants"] = [_variant_result(variant, variants[0], args.steps, by_name) for variant in variants]
    if args.compile is not None:
        result["graph_break_reasons"] = graph_break_reasons()
    result["notes"] = notes
    if clock.cuda:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    # Free this model's weights before the next one.
    del variants, live, base
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    return result


def _attempt(model_key: str, variant: Variant, action: Callable[[Variant], None]) -> bool:
    """Run one step of a variant; a failure (out of memory, a kernel error the pack did
    not absorb) is recorded with the results and the other variants go on."""
    try:
        action(variant)
    except Exception as error:
        log.exception("%s: %s failed", model_key, variant.name)
        variant.error = f"{type(error).__name__}: {error}"
        return False
    return True


def _variant_result(variant: Variant, default: Variant, steps: int,
                    by_name: Optional[dict[str, Variant]] = None) -> dict:
    row: dict[str, Any] = {"name": variant.name}
    if variant.error is not None:
        row["error"] = variant.error
    if variant.dynamo is not None:
        row["dynamo"] = variant.dynamo
    if variant.compiled_from is not None:
        _compiled_rows(row, variant, by_name or {}, steps)
    if variant.state is not None and variant.state.last_report is not None:
        report = variant.state.last_report
        row["served"] = report["shares"]
        row["fallbacks"] = report["fallbacks"]
        row["plans"] = [{key: plan[key] for key in ("signature", "backend", "calls")} for plan in report["plans"]]
        if report.get("quality") is not None:
            row["quality"] = report["quality"]
            row["routing"] = report["routing"]
    if variant.tuning is not None:
        row["tuning"] = variant.tuning
    if variant.output is not None:
        row["finite"] = bool(torch.isfinite(variant.output).all())
    if not variant.sample_ms:
        return row
    step = statistics.median(variant.sample_ms) / steps
    row.update(step_ms=step, sample_ms=variant.sample_ms, repeats=len(variant.sample_ms))
    steady = statistics.median(variant.step_intervals_ms) if variant.step_intervals_ms else None
    row["steady_step_ms"] = steady
    if default.sample_ms:
        default_step = statistics.median(default.sample_ms) / steps
        row["speedup"] = default_step / step
        default_steady = statistics.median(default.step_intervals_ms) if default.step_intervals_ms else None
        if steady and default_steady:
            row["steady_speedup"] = default_steady / steady
    if variant.attention_ms is None:
        return row
    attention = variant.attention_ms / steps
    row.update(attention_ms_per_step=attention, attention_share=attention / step,
               attention_by_shape=variant.attention_by_shape)
    if default.attention_ms is not None and default.sample_ms:
        default_attention = default.attention_ms / steps
        row["predicted_speedup"] = _predicted(default_step, default_attention, attention)
        row["measured_over_predicted"] = row["speedup"] / row["predicted_speedup"]
        if "steady_speedup" in row:
            row["steady_predicted_speedup"] = _predicted(default_steady, default_attention, attention)
            row["steady_measured_over_predicted"] = row["steady_speedup"] / row["steady_predicted_speedup"]
    return row


def _compiled_rows(row: dict, variant: Variant, by_name: dict[str, Variant], steps: int) -> None:
    """A compiled variant against the compiled default, predicted from the eager twins'
    attention times (the kernels are the same; a timing override cannot run inside a
    compiled graph without breaking it)."""
    base = by_name.get(COMPILED)
    if base is None or not base.sample_ms or not variant.sample_ms:
        return
    step = statistics.median(variant.sample_ms) / steps
    base_step = statistics.median(base.sample_ms) / steps
    row["speedup_vs_compiled"] = base_step / step
    if base.step_intervals_ms and variant.step_intervals_ms:
        row["steady_vs_compiled"] = statistics.median(base.step_intervals_ms) / statistics.median(
            variant.step_intervals_ms)
    eager_default, eager_twin = by_name.get(DEFAULT), by_name.get(variant.compiled_from)
    if eager_default is not None and eager_twin is not None and eager_default.attention_ms and eager_twin.attention_ms:
        predicted = _predicted(base_step, eager_default.attention_ms / steps, eager_twin.attention_ms / steps)
        row["predicted_vs_compiled"] = predicted
        row["measured_over_predicted_vs_compiled"] = row["speedup_vs_compiled"] / predicted


def _predicted(step: float, attention: float, variant_attention: float) -> float:
    """The step speedup if only the attention time changed: T / (T - T_a + T_a')."""
    return step / (step - attention + variant_attention)


def choose_backends(pack: Any, requested: Optional[str], tiny: bool) -> tuple[list[str], list[dict]]:
    """(selections to run, [{backend, reason}] skipped).

    Backends first, then the node's automatic selections (`auto`, and `auto_tuned`
    where the pack has it): `auto` always runs, the others by default or when named.
    """
    registry = pack.attention.registry
    table = {backend.name: availability for backend, availability in registry.availability_table()}
    automatic = [name for name in pack.nodes.routes.selectable() if name not in table]
    if requested:
        try:
            names = list(pack.attention.parse_priority(requested).names)
        except registry.UnknownBackendError as error:
            raise SystemExit(f"--backends: {error}") from None
        automatic = [name for name in automatic if name in names or name == registry.AUTO]
        sparse = [name for name in names if name in table and registry.get(name).sparse]
        if sparse:
            raise SystemExit(f"--backends: {', '.join(sparse)} are sparse: name them with --sparse, which runs them "
                             f"through the Attention Backend (Sparse) node")
    else:
        names = [name for name in table if not registry.get(name).sparse]
    run, skipped = [], []
    for name in names:
        if name not in table:
            continue  # an automatic selection, run after the backends
        availability = table[name]
        if not availability.available:
            skipped.append({"backend": name, "reason": "; ".join(availability.reasons)})
        elif not requested and not tiny and name in SLOW_AT_FULL_SIZE:
            skipped.append({"backend": name, "reason": SLOW_AT_FULL_SIZE[name]})
        else:
            run.append(name)
    return run + automatic, skipped


def choose_sparse(pack: Any, requested: str) -> tuple[list[str], list[dict]]:
    """(sparse backends to run through the Sparse node, [{backend, reason}] skipped)."""
    registry = pack.attention.registry
    run, skipped = [], []
    for name in filter(None, (part.strip() for part in requested.split(","))):
        if name not in registry.sparse_names():
            raise SystemExit(f"--sparse: {name!r} is not a sparse backend ({', '.join(registry.sparse_names())})")
        availability = registry.get(name).availability()
        if availability.available:
            run.append(name)
        else:
            skipped.append({"backend": name, "reason": "; ".join(availability.reasons)})
    return run, skipped


def environment(pack: Any, device: torch.device) -> dict:
    """Versions of everything that decides the numbers."""
    import comfy.ldm.modules.attention as comfy_attention

    registry = pack.attention.registry
    packages = {"torch": torch.__version__}
    for name in ["triton"] + [backend.package.distribution for backend in registry.all_backends()
                              if backend.package is not None]:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    env: dict[str, Any] = {
        "python": platform.python_version(), "packages": packages, "comfyui": pack.nodes.compat.comfyui_version(),
        "comfyui_default_attention": getattr(comfy_attention.optimized_attention, "__name__", "?"),
        "device": str(device), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = list(torch.cuda.get_device_capability(device))
        capability = tuple(env["capability"])
    else:
        env["cpu"] = platform.processor() or platform.machine()
        capability = None
    env["auto_order"] = [entry.backend for entry in pack.attention.auto_entries(device.type, capability)]
    env["backends"] = [{"name": backend.name, "available": availability.available, "version": availability.version,
                        "reasons": list(availability.reasons)}
                       for backend, availability in registry.availability_table()]
    return env


def _fmt(value: Optional[float], digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _served(row: dict, comfyui_function: str) -> str:
    shares = row.get("served")
    if not shares:
        return f"ComfyUI's `{comfyui_function}`" if row["name"] in (DEFAULT, DEFAULT_AGAIN) else "–"
    return ", ".join(f"{name} {share:.0%}" for name, share in shares.items())


COLUMNS = ("model", "variant", "served by", "step ms", "steady step ms", "attention ms/step", "attention share",
           "speedup", "predicted", "measured/predicted", "steady speedup", "steady predicted",
           "steady measured/predicted")


def _table_row(key: str, row: dict, comfyui_function: str) -> str:
    if "error" in row:
        cells = [key, row["name"], f"error: {row['error'][:80]}"] + ["–"] * (len(COLUMNS) - 3)
    else:
        share = row.get("attention_share")
        cells = [key, row["name"], _served(row, comfyui_function), _fmt(row.get("step_ms")),
                 _fmt(row.get("steady_step_ms")), _fmt(row.get("attention_ms_per_step")),
                 _fmt(None if share is None else 100 * share, 1, "%")]
        cells += [_fmt(row.get(name), 3) for name in (
            "speedup", "predicted_speedup", "measured_over_predicted", "steady_speedup",
            "steady_predicted_speedup", "steady_measured_over_predicted")]
    return "| " + " | ".join(cells) + " |"


def _model_line(key: str, model: dict) -> str:
    if "variants" not in model:
        return f"- {key}: failed: {model.get('error', 'not run')}"
    calls = "; ".join(f"{entry['calls_per_step']:g}× {entry['shape']}"
                      for entry in model["variants"][0].get("attention_by_shape", []))
    line = (f"- {key}: {model['title']}, {model['config_class']} {model['dtype']}, "
            f"{model['parameters'] / 1e6:,.1f} M parameters, latent {model['latent']}, cfg {model['cfg']}; "
            f"attention calls per step: {calls or 'not measured'}")
    not_finite = [row["name"] for row in model["variants"] if row.get("finite") is False]
    if not_finite:
        line += f"; NON-FINITE output: {', '.join(not_finite)}"
    return "\n".join([line] + [f"  - {note}" for note in model.get("notes", [])])


def markdown(results: dict) -> str:
    env = results["environment"]
    where = env.get("gpu") or env.get("cpu")
    lines = [
        f"# End-to-end sampler steps ({'tiny dims' if results['tiny'] else 'real configurations'})",
        "",
        (f"{where}, torch {env['packages']['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
         f"ComfyUI {env['comfyui']} (default attention: `{env['comfyui_default_attention']}`); "
         f"{results['sampler']}/{results['scheduler']}, {results['steps']} steps, median of {results['repeats']} "
         f"interleaved samples. Speedups are the default's time over the variant's; predicted = "
         f"T / (T − T_a + T_a′) from the default's step time T and attention time T_a. "
         f"`{DEFAULT_AGAIN}` is the default timed a second time in the same rounds: its speedup columns "
         f"are the noise floor of the others."),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for key, model in results["models"].items():
        lines.extend(_table_row(key, row, env["comfyui_default_attention"]) for row in model.get("variants", []))
    lines.extend(_compiled_table(results))
    lines.append("")
    lines.extend(_model_line(key, model) for key, model in results["models"].items())
    lines.extend(f"- skipped `{entry['backend']}`: {entry['reason']}" for entry in results["skipped_backends"])
    lines.extend(f"- {note}" for note in results["notes"])
    return "\n".join(lines) + "\n"


COMPILED_COLUMNS = ("model", "variant", "served by", "step ms", "vs compiled default", "steady vs compiled default",
                    "predicted", "measured/predicted", "graph breaks (warm-up)", "frames (warm-up)", "warm-up s")


def _compiled_table(results: dict) -> list[str]:
    """Compiled variants against the compiled default; dynamo's counts per variant."""
    rows = [(key, row) for key, model in results["models"].items() for row in model.get("variants", [])
            if row["name"].startswith(COMPILED)]
    if not rows:
        return []
    lines = ["", "Compiled (TorchCompileModel, inductor): each variant against the compiled default in the same "
             "rounds; predicted from the eager twins' attention times. `compiled (timed again)` is the compiled "
             "default timed a second time in the same rounds: its ratio is the noise floor of this column. Graph "
             "breaks and frames are dynamo's counts over the variant's two warm-up samples (the node's variants "
             "share one cache, so only the first compiles).", "",
             "| " + " | ".join(COMPILED_COLUMNS) + " |", "|" + "---|" * len(COMPILED_COLUMNS)]
    for key, row in rows:
        dynamo = row.get("dynamo", {})
        cells = [key, row["name"], _served(row, "compiled default") if "error" not in row else "error",
                 _fmt(row.get("step_ms"))]
        cells += [_fmt(row.get(name), 3) for name in ("speedup_vs_compiled", "steady_vs_compiled",
                                                      "predicted_vs_compiled", "measured_over_predicted_vs_compiled")]
        cells += [str(dynamo.get("graph_breaks_at_warm_up", "–")), str(dynamo.get("frames_at_warm_up", "–")),
                  str(dynamo.get("warm_up_s", "–"))]
        lines.append("| " + " | ".join(cells) + " |")
    for key, model in results["models"].items():
        during = model.get("dynamo_during_timed_rounds")
        if during is not None:
            lines.append(f"- {key}: during the timed rounds dynamo compiled {during['frames']} new frames and broke "
                         f"{during['graph_breaks']} graphs")
    return lines


def write(results: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "end_to_end.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    table = markdown(results)
    (out / "end_to_end.md").write_text(table, encoding="utf-8")
    return table


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="flux,wan,sdxl", help="comma-separated: flux, wan, sdxl")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends and automatic selections (default: every backend "
                             "available here, auto and auto_tuned; auto always runs)")
    parser.add_argument("--sparse", default="",
                        help="comma-separated sparse backends (sol, sparge), each run through the Attention Backend "
                             "(Sparse) node with its defaults: settings, step window 0.2-0.9, first and last block "
                             "dense, quality monitor")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny dims in fp32: the same path on a CPU in seconds")
    parser.add_argument("--out", default="end_to_end_results", help="folder for end_to_end.json and .md")
    parser.add_argument("--time-budget", type=float, default=360.0,
                        help="seconds; what is left after that is skipped, with a note (default 360)")
    parser.add_argument("--dtype", choices=("comfy", "bf16", "fp16", "fp32"), default="comfy",
                        help="weight and compute dtype (default: ComfyUI's own choice for the model and device)")
    parser.add_argument("--flux-blocks", default="4,8", help="double,single Flux blocks (the real model: 19,38)")
    parser.add_argument("--wan-layers", type=int, default=3, help="Wan blocks (the real 14B model: 40)")
    parser.add_argument("--compile", default=None, metavar="BACKENDS",
                        help="also TorchCompileModel (inductor): the default compiled, and the node on each of "
                             "these comma-separated backends, compiled (e.g. auto,flash4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--verbose", action="store_true", help="ComfyUI's and the pack's INFO logs too")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the steady step time needs two step callbacks)")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI tree")
    out = Path(args.out).resolve()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        raise SystemExit("--device cuda: no CUDA device is visible")
    setup_comfyui(Path(comfyui_path).resolve(), cpu=not cuda)
    import comfy.model_management as mm
    import folder_paths

    # auto_tuned saves its decisions in ComfyUI's user directory: keep them with the
    # results (a later run with the same --out reuses them), out of the ComfyUI tree.
    folder_paths.set_user_directory(str(out / "comfyui_user"))

    pack = load_pack()
    device = mm.get_torch_device()
    clock = Clock(device)
    notes: list[str] = []
    budget = Budget(args.time_budget, notes)
    backends, skipped = choose_backends(pack, args.backends, args.tiny)
    args.sparse_backends, skipped_sparse = choose_sparse(pack, args.sparse)
    skipped += skipped_sparse
    for entry in skipped:
        log.info("skipped %s: %s", entry["backend"], entry["reason"])
    double, single = (int(n) for n in args.flux_blocks.split(","))
    specs = {"flux": lambda: flux_spec(args.tiny, double, single), "wan": lambda: wan_spec(args.tiny, args.wan_layers),
             "sdxl": lambda: sdxl_spec(args.tiny)}
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in models if name not in specs]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(specs)}")

    results: dict[str, Any] = {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv, "tiny": args.tiny, "steps": args.steps, "repeats": args.repeats,
        "sampler": SAMPLER, "scheduler": SCHEDULER, "pack_module": PACK,
        "environment": environment(pack, device),
        "variants": [DEFAULT] + backends + [DEFAULT_AGAIN] + [sparse_variant(name) for name in args.sparse_backends],
        "skipped_backends": skipped, "notes": notes, "models": {},
    }
    log.info("variants: %s", ", ".join(results["variants"]))
    for name in models:
        if budget.spent(f"model {name}"):
            continue
        log.info("%s: building and timing", name)
        started = time.perf_counter()
        try:
            results["models"][name] = run_model(specs[name](), args, pack, backends, clock, budget)
        except Exception as error:  # e.g. out of memory: the other models still run
            log.exception("%s failed", name)
            results["models"][name] = {"error": f"{type(error).__name__}: {error}"}
            mm.unload_all_models()
            gc.collect()
            mm.soft_empty_cache()
        results["models"][name]["wall_s"] = round(time.perf_counter() - started, 1)
        write(results, out)  # after every model: a run cut short still leaves what it measured
    table = write(results, out)
    print(table)  # noqa: T201 - the CLI's final table
    return 0


if __name__ == "__main__":
    sys.exit(main())
