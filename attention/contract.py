"""The structured fields the browser reads (docs/api.md), made in one place so the web
extension never has to take the library's prose apart:

- a call signature as fields (from a CallSignature, or from the tuner's text key);
- a tuner verdict as {kind, text};
- an install hint as {command, note};
- a priority list read the one way the nodes read it (priority_list.parse_priority):
  its entries as {kind, name}, or why it is refused; the cases the browser's copy of the
  grammar is tested against.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .backend import Package
from .call import MASK_NONE, CallSignature
from .priority_list import PriorityError, parse_priority

# Verdict kinds, in the words of attention.tuning.decide and measure_on_device.
CHOSEN = "chosen"
SLOWER = "slower"
INSIDE_NOISE = "inside_noise"  # faster than the kept choice, by less than the noise floor
OVER_BUDGET = "over_budget"
NONFINITE = "nonfinite"
RAISED = "raised"
NOT_MEASURED = "not_measured"
NOT_TIMED = "not_timed"
UNKNOWN = "unknown"  # a verdict from a tuner version this one does not know
VERDICT_KINDS = (CHOSEN, SLOWER, INSIDE_NOISE, OVER_BUDGET, NONFINITE, RAISED, NOT_MEASURED, NOT_TIMED, UNKNOWN)

# Install commands start with one of these; any other hint is a note (e.g. "built from source").
_COMMANDS = ("pip ", "pip3 ", "uv ", "python ", "conda ")


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


def signature_fields(call: CallSignature) -> dict[str, Any]:
    """A call signature as the fields the browser shows."""
    return {
        "dtype": _dtype_name(call.dtype), "batch": call.batch, "heads": call.heads_q, "kv_heads": call.heads_kv,
        "q_tokens": call.seq_q, "k_tokens": call.seq_k, "head_dim": call.head_dim, "v_head_dim": call.head_dim_v,
        "mask": None if call.mask_kind == MASK_NONE else {"kind": call.mask_kind,
                                                          "shape": list(call.mask_shape or ())},
        "layout_in": call.layout_in, "layout_out": call.layout_out,
        "precision": _dtype_name(call.attn_precision), "low_precision_ok": call.low_precision_ok,
        "custom_scale": call.custom_scale, "device": call.device_type,
        "capability": None if call.compute_capability is None else "%d.%d" % call.compute_capability,
    }


def key_fields(key: str) -> Optional[dict[str, Any]]:
    """The fields of a tuner key (attention.tuning.signature_key), or None for a key in
    another format. The key holds no device: the store files it under one."""
    parts = str(key).split("|")
    if len(parts) != 14:
        return None
    values: dict[str, str] = {}
    for part, prefix in zip(parts[1:], ("B", "H", "Hkv", "Nq", "Nk", "D", "Dv", "mask=", "in=", "out=", "prec=",
                                        "lowp=", "scale=")):
        if not part.startswith(prefix):
            return None
        values[prefix] = part[len(prefix):]
    try:
        numbers = {name: int(values[name]) for name in ("B", "H", "Hkv", "Nq", "Nk", "D", "Dv")}
        kind, _, shape = values["mask="].partition(":")
        mask = None if kind == MASK_NONE else {"kind": kind, "shape": [int(n) for n in shape.split("x") if n]}
    except ValueError:
        return None
    return {
        "dtype": parts[0], "batch": numbers["B"], "heads": numbers["H"], "kv_heads": numbers["Hkv"],
        "q_tokens": numbers["Nq"], "k_tokens": numbers["Nk"], "head_dim": numbers["D"], "v_head_dim": numbers["Dv"],
        "mask": mask, "layout_in": values["in="], "layout_out": values["out="],
        "precision": None if values["prec="] == "-" else values["prec="], "low_precision_ok": values["lowp="] == "1",
        "custom_scale": values["scale="] == "1", "device": None, "capability": None,
    }


def verdict(text: Any) -> dict[str, str]:
    """A tuner verdict as {kind, text}: the kind for the browser's label and colour, the
    text as the tuner wrote it."""
    text = str(text if text is not None else "")
    if text == "chosen":
        kind = CHOSEN
    elif text.startswith("slower"):
        kind = SLOWER
    elif text.startswith("inside the noise floor"):
        kind = INSIDE_NOISE
    elif text.startswith("over the error budget"):
        kind = OVER_BUDGET
    elif text.endswith("non-finite values"):
        kind = NONFINITE
    elif text.startswith("raised"):
        kind = RAISED
    elif text.startswith("not measured"):
        kind = NOT_MEASURED
    elif text == "not timed":
        kind = NOT_TIMED
    else:
        kind = UNKNOWN
    return {"kind": kind, "text": text}


def decision_json(decision: dict[str, Any]) -> dict[str, Any]:
    """A tuner decision (saved, or in a run's summary) with its signature as fields and
    every candidate's verdict as {kind, text}."""
    candidates = decision.get("candidates") or {}
    return {**decision, "shape": key_fields(decision.get("signature", "")),
            "candidates": {name: {**row, "verdict": verdict(row.get("verdict"))} for name, row in candidates.items()}}


def install_hint(package: Optional[Package]) -> Optional[dict[str, Optional[str]]]:
    """How to install a backend's package: {command, note}; command is None when there is
    nothing to copy (built from source), note holds the rest ("" when nothing)."""
    if package is None:
        return None
    hint = package.hint().strip()
    if not hint.startswith(_COMMANDS):
        return {"command": None, "note": hint}
    command, opening, note = hint.partition(" (")
    if opening and note.endswith(")"):
        return {"command": command.strip(), "note": note[:-1].strip()}
    return {"command": hint, "note": ""}


def priority_case(text: str) -> dict[str, Any]:
    """How the nodes read a priority text: {text, entries: [{kind, name}], uses_tuner},
    kind "backend", "auto" or "auto_tuned"; or, refused, {text, error, empty, unknown}."""
    try:
        priority = parse_priority(text)
    except PriorityError as error:
        return {"text": text, "error": str(error), "empty": error.empty, "unknown": list(error.unknown)}
    return {"text": text, "entries": [{"kind": entry.kind, "name": entry.name} for entry in priority],
            "uses_tuner": priority.uses_tuner}
