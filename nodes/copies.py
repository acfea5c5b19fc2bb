"""One active copy of the pack per process.

A user may have the pack twice under custom_nodes (a Manager install beside a git
clone: `ComfyUI-Attention-Backends` and `comfyui-attention-backends`). ComfyUI imports
each folder as its own package, so each copy would have its own report store and
routes: nodes from the copy loaded last, routes from the one loaded first, and
`GET /attention_backends/report` empty. The first copy to load claims a fixed entry in
`sys.modules`; a later copy finds it, says so once naming both folders, and registers
nothing, so every node, route and report comes from the first.

Imports nothing from the pack or ComfyUI: the entry point calls it before anything else.
"""

from __future__ import annotations

import logging
import os
import sys
import types
from typing import Optional

# Fixed on purpose: the same in every copy and every version from this one on.
REGISTRY = "comfyui_attention_backends.active_copy"

log = logging.getLogger(__name__)


def _looks_like_this_pack(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, *part)) for part in
               (("__init__.py",), ("nodes", "report.py"), ("attention", "dispatch.py")))


def _older_copy(package: str, folder: str) -> Optional[str]:
    """The folder of a copy loaded before the registry existed (an older release), if any."""
    for name, module in list(sys.modules.items()):
        # The module's own namespace: a module-level __getattr__ elsewhere may import or raise.
        namespace = getattr(module, "__dict__", None) or {}
        if name == package or namespace.get("WEB_DIRECTORY") != "./web" or "comfy_entrypoint" not in namespace:
            continue
        other = os.path.dirname(namespace.get("__file__") or "")
        if other and other != folder and _looks_like_this_pack(other):
            return other
    return None


def claim(package: str, folder: str) -> Optional[str]:
    """Register `folder` (package `package`) as the active copy, or return the folder of
    the copy that already is. A copy that gets a folder back must register nothing."""
    active = sys.modules.get(REGISTRY)
    if active is not None and active.package != package:
        return active.folder
    if active is None:
        older = _older_copy(package, folder)
        if older is not None:
            return older
        active = types.ModuleType(REGISTRY, "The copy of ComfyUI Attention Backends this process uses.")
        active.package = package
        active.folder = folder
        sys.modules[REGISTRY] = active
    return None


def warn_duplicate(folder: str, active: str) -> None:
    log.warning("ComfyUI Attention Backends is installed twice: %s is in use, %s was loaded too and stays idle "
                "(its nodes, routes and web extension are not registered). Remove one of the two folders from "
                "custom_nodes and restart ComfyUI.", active, folder)
