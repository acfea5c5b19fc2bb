"""What the pack needs from the ComfyUI it runs in, looked up in one place."""

from __future__ import annotations

import sys
from typing import Any, Optional

# The transformer_options key ComfyUI's `wrap_attn` decorator looks for (DESIGN §3).
OVERRIDE_KEY = "optimized_attention_override"

# The first release whose attention functions carry `wrap_attn`.
MINIMUM_COMFYUI = "0.3.60"


class UnsupportedComfyUIError(RuntimeError):
    """This ComfyUI cannot route attention through an override."""


def comfyui_version() -> str:
    """The running ComfyUI's version, or "unknown" (checkouts without comfyui_version.py)."""
    try:
        from comfyui_version import __version__
    except ImportError:
        return "unknown"
    return str(__version__)


def require_override() -> None:
    """Raise, naming the minimum version, when this ComfyUI has no attention override."""
    import comfy.ldm.modules.attention as attention_module

    if not hasattr(attention_module, "wrap_attn"):
        raise UnsupportedComfyUIError(
            f"Attention Backend needs ComfyUI {MINIMUM_COMFYUI} or newer: this ComfyUI ({comfyui_version()}) "
            f"has no attention override ({OVERRIDE_KEY}). Update ComfyUI to use this node.")


def prompt_server() -> Optional[Any]:
    """ComfyUI's running PromptServer, or None (scripts and tests run ComfyUI without one).

    Looked up in sys.modules rather than imported: importing `server` ourselves would
    build its web application as a side effect where no server runs.
    """
    server_module = sys.modules.get("server")
    server_class = getattr(server_module, "PromptServer", None)
    return getattr(server_class, "instance", None)
