"""What ComfyUI is running right now: the prompt and the node being executed.

A run report belongs to the Attention Backend node the sampler actually ran through.
The node's own id is not enough: ComfyUI reuses a node's cached output for another node
with identical inputs (its hidden unique id is no part of the cache key) and for the
same node renumbered in a later workflow, so one patched MODEL, and the id it was made
with, can reach samplers fed by other nodes. At run time the sampler is the executing
node (`comfy_execution.utils.get_executing_context()`, ComfyUI 0.3.4x and newer), and
the running prompt (`PromptServer.instance.prompt_queue.currently_running`) says which
nodes feed it.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Optional

from ..attention import PriorityError, parse_priority
from .compat import prompt_server
from .state import PatchState

log = logging.getLogger(__name__)


def executing_prompt() -> Optional[tuple[str, str, dict]]:
    """(prompt id, executing node id, prompt) while a node of a queued prompt runs, else None
    (scripts and tests that sample without ComfyUI's executor)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    queue = getattr(prompt_server(), "prompt_queue", None)
    if context is None or queue is None:
        return None
    with queue.mutex:  # the server thread adds to it
        items = list(queue.currently_running.values())
    for item in items:
        if item[1] == context.prompt_id and isinstance(item[2], dict):
            return str(context.prompt_id), str(context.node_id), item[2]
    return None


def _links(inputs: Any) -> list[str]:
    """Node ids an input dict links to ([node id, output index] values)."""
    if not isinstance(inputs, dict):
        return []
    return [str(value[0]) for value in inputs.values()
            if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int)]


def upstream(prompt: dict, node_id: str, wanted: Callable[[dict], bool]) -> list[str]:
    """Ids of the nodes feeding `node_id`, directly or not, for which `wanted(node)` holds,
    nearest first."""
    found: list[str] = []
    seen = {node_id}
    queue = deque(_links((prompt.get(node_id) or {}).get("inputs")))
    while queue:
        current = queue.popleft()
        if current in seen or current not in prompt:
            continue
        seen.add(current)
        node = prompt[current]
        if isinstance(node, dict):
            if wanted(node):
                found.append(current)
            queue.extend(_links(node.get("inputs")))
    return found


def report_node(state: PatchState) -> dict[str, Optional[str]]:
    """Where this run's report is filed: the Attention Backend node feeding the executing
    sampler that this state can stand for (its own id, or a node with identical inputs
    whose cached output ComfyUI handed over), the sampler, and the prompt. Outside
    ComfyUI's executor, the node the state was made by."""
    try:
        running = executing_prompt()
    except Exception:  # a ComfyUI whose queue looks otherwise: the report keeps the state's node
        log.debug("attention backends: could not read the running prompt", exc_info=True)
        running = None
    if running is None:
        return {"node_id": state.node_id, "sampler_node_id": None, "prompt_id": None}
    prompt_id, sampler, prompt = running
    feeding = upstream(prompt, sampler, lambda node: node.get("class_type") == state.node_type)
    node_id = state.node_id
    if str(state.node_id) not in feeding:
        same = [candidate for candidate in feeding if _same_inputs(state, prompt[candidate])]
        node_id = same[0] if same else state.node_id
    return {"node_id": node_id, "sampler_node_id": sampler, "prompt_id": prompt_id}


def _same_inputs(state: PatchState, node: dict) -> bool:
    """Whether a node of the state's type was given the choices this state was made with."""
    from .patch import STOP  # patch.py imports the report, which imports this module

    inputs = node.get("inputs") or {}
    if inputs.get("on_unsupported") is not None and (inputs["on_unsupported"] == STOP) != state.strict:
        return False
    selection = inputs.get("backend", inputs.get("priority"))
    if not isinstance(selection, str):
        return True  # wired from another node: nothing to compare
    try:
        return parse_priority(selection).text == state.selection
    except PriorityError:
        return False
