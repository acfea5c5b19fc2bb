"""`python -m attention doctor`: every backend on this machine, and what `auto` does here."""

from __future__ import annotations

import json
import sys
from typing import Optional, TextIO

from .status import machine_status


def _format_rule(rule: dict) -> str:
    parts = []
    if "min_tokens" in rule:
        parts.append(f"from {rule['min_tokens']} tokens")
    if "head_dims" in rule:
        parts.append("head dim " + "/".join(map(str, rule["head_dims"])))
    return ", ".join(parts) or "always"


def format_install(install: Optional[dict]) -> str:
    """An install hint ({command, note}) in one line: "pip install x (note)", or the note alone."""
    if not install:
        return ""
    if install["command"] and install["note"]:
        return f"{install['command']} ({install['note']})"
    return install["command"] or install["note"]


def render(status: dict) -> str:
    lines = [f"torch {status['torch']}  CUDA {status['cuda'] or '-'}  cuDNN {status['cudnn'] or '-'}", ""]
    width = max(len(row["name"]) for row in status["backends"])
    lines.append(f"{'backend':<{width}}  {'kind':<9}  {'ready':<5}  {'version':<18}  why not")
    for row in status["backends"]:
        kind = "quantized" if row["quantized"] else "exact"
        ready = "yes" if row["available"] else "no"
        version = row["version"] or "-"
        reasons = "; ".join(row["reasons"])
        install = format_install(row["install"])
        lines.append(f"{row['name']:<{width}}  {kind:<9}  {ready:<5}  {version:<18}  {reasons}"
                     + (f" ({install})" if install else ""))
    for device in status["devices"]:
        title = device["name"] if device["type"] == "cpu" else (
            f"cuda:{device['index']} {device['name']} (sm {device['capability']}, class {device['class']})")
        lines += ["", f"auto on {title}:"]
        for position, entry in enumerate(device["auto_order"], 1):
            state = "" if entry["available"] else "   [not available: " + "; ".join(entry["reasons"]) + "]"
            lines.append(f"  {position}. {entry['backend']:<30} {_format_rule(entry['rule'])}{state}")
        lines.append("  typical calls:")
        for choice in device["typical"]:
            lines.append(f"    {choice['shape']:<24} -> {choice['backend']}")
    return "\n".join(lines)


def main(as_json: bool = False, out: TextIO = sys.stdout) -> int:
    status = machine_status()
    out.write((json.dumps(status, indent=2) if as_json else render(status)) + "\n")
    return 0
