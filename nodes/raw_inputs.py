"""Boolean inputs checked as posted, before ComfyUI converts them.

ComfyUI's prompt validation (0.3.64 to 0.28.0 alike) replaces a BOOLEAN input's value
with `bool(value)` before a node's `validate_inputs` runs, so the string "false" reaches
the node as True, and no node can tell. ComfyUI hands every posted prompt to its
on-prompt handlers first: `mark_non_boolean_inputs` is one. It replaces a value of one
of our boolean inputs that is no JSON boolean with a `NotABoolean`, whose conversion to
bool raises; ComfyUI then refuses the prompt with "Failed to convert an input value to a
BOOLEAN value", filed under that input alone, with our message.

No ComfyUI import and no relative import: the CPU tests load this file on its own.
"""

from __future__ import annotations

from typing import Any

# The BOOLEAN inputs of the pack's nodes: node class -> (its display name, input names).
BOOLEAN_INPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "AttentionBackendAdvanced": ("Attention Backend (Advanced)", ("nonfinite_guard",)),
}


def not_boolean_problem(name: str, value: Any) -> str:
    """What is wrong with a boolean input given something else (validation and run time alike)."""
    return f"{name} must be true or false (a JSON boolean), not {value!r}"


class NotABoolean(str):
    """A posted value that is no boolean. It reads as the value as posted (the prompt
    error shows it, and it is JSON) and refuses to become a bool."""

    problem: str

    def __new__(cls, problem: str, value: Any) -> "NotABoolean":
        marked = super().__new__(cls, repr(value))
        marked.problem = problem
        return marked

    def __bool__(self) -> bool:
        raise ValueError(self.problem)


def mark_non_boolean_inputs(json_data: Any) -> Any:
    """ComfyUI on-prompt handler: mark our boolean inputs whose posted value is no boolean
    (links and `{"__value__": ...}` wrappers are looked through, not marked). Returns the
    request, changed in place."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    for node in prompt.values():
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            continue
        title, names = BOOLEAN_INPUTS.get(node.get("class_type"), ("", ()))
        inputs = node["inputs"]
        for name in names:
            if name not in inputs:
                continue
            value = inputs[name]
            posted = value["__value__"] if isinstance(value, dict) and "__value__" in value else value
            if isinstance(posted, (bool, list)):  # a boolean, or a link to another node's output
                continue
            inputs[name] = NotABoolean(f"{title}: {not_boolean_problem(name, posted)}", posted)
    return json_data
