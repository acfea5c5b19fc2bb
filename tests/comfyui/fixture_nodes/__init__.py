"""Test-only ComfyUI nodes: a tiny real Flux model and conditioning for it, so a server
test can run a whole workflow on a CPU without model files, and the fault suite's probes
(faults.py). Never shipped."""

from . import faults
from .tiny_models import flux_conditioning, tiny_flux


class TinyFluxModel:
    CATEGORY = "testing/attention_backends"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1 << 31})}}

    def build(self, seed):
        return (tiny_flux(seed),)


class TinyFluxConditioning:
    CATEGORY = "testing/attention_backends"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1 << 31})}}

    def build(self, seed):
        return flux_conditioning(seed)


NODE_CLASS_MAPPINGS = {
    "AttentionBackendsTestTinyFlux": TinyFluxModel,
    "AttentionBackendsTestFluxConditioning": TinyFluxConditioning,
    **faults.NODE_CLASS_MAPPINGS,
}
