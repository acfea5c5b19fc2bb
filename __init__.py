"""ComfyUI Attention Backends: the entry point ComfyUI imports from custom_nodes/.

ComfyUI imports this file by path under a module name it makes up, so everything in
the pack is imported relatively. Nodes use the V3 schema (`comfy_entrypoint`).

The repository root is also a Python package to pytest, which imports this file where
no ComfyUI exists (CI): then it defines nothing beyond WEB_DIRECTORY.

A second copy of the pack in custom_nodes stays idle (nodes/copies.py): no nodes, no
routes, no web extension, and one warning naming both folders.
"""

import importlib.util
import logging
import os

WEB_DIRECTORY = "./web"

# Relative imports only inside the branches: pytest may import this file with no parent
# package (a checkout directory whose name is no Python identifier), where none resolve.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes.copies import claim, warn_duplicate

    _folder = os.path.dirname(os.path.abspath(__file__))
    _active = claim(__name__, _folder)
    if _active is None:
        from .nodes import routes
        from .nodes.attention_backend import comfy_entrypoint
        from .nodes.compat import prompt_server

        _server = prompt_server()
        if _server is not None:
            routes.register(_server)
    else:
        from comfy_api.latest import ComfyExtension

        WEB_DIRECTORY = None
        warn_duplicate(_folder, _active)

        class _IdleCopy(ComfyExtension):
            async def get_node_list(self) -> list:
                return []

        async def comfy_entrypoint() -> ComfyExtension:
            return _IdleCopy()
elif importlib.util.find_spec("comfy") is not None:
    from .nodes.compat import MINIMUM_COMFYUI

    # A ComfyUI older than the V3 node API (0.3.48) cannot have the attention override either.
    logging.getLogger(__name__).error("ComfyUI Attention Backends needs ComfyUI %s or newer; this ComfyUI has "
                                      "no comfy_api, so the pack's nodes are not loaded.", MINIMUM_COMFYUI)
