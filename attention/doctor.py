"""`python -m attention doctor`: every backend on this machine, and what `auto` does here."""

from __future__ import annotations

import json
import sys
from typing import Optional, TextIO

from .parallel.status import render as render_parallel
from .cost_model import CONTESTED_FROM_US, CONTESTED_WITHIN
from .status import machine_status
from .tuning import AUTO_MEASURED_FILE, ENV_AUTO_MEASURE, auto_measures


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


def _source_line(source: dict) -> str:
    kind = source.get("source", "rules")
    if kind == "calibrated":
        line = f"auto decides by this GPU's calibration (python -m attention calibrate; {source['files'][0]})"
        if source.get("rescaled_from"):
            levels = ", ".join(f"{name} host x{level['host']:.2f} GPU x{level['gpu']:.2f}"
                               for name, level in source["levels"].items())
            line += f"\n    the model shipped for {source['rescaled_from']}, at this machine's levels: {levels}"
        return line + _contested_line()
    if kind == "default":
        return (f"auto decides by the cost model shipped for this GPU class (fitted on {source['gpu']}); "
                "`python -m attention calibrate` fits this GPU's own" + _contested_line())
    return "auto decides by the rule table above (no cost model for this device class)"


def _contested_line() -> str:
    if not auto_measures():
        return f"\n    calls the model cannot separate are not timed ({ENV_AUTO_MEASURE}=0): its first choice runs"
    return (f"\n    on a call the model cannot separate (SDPA predicted at {CONTESTED_FROM_US:.0f} µs or more, "
            f"kernels within {CONTESTED_WITHIN:.1%}), auto times those kernels once per machine "
            f"({AUTO_MEASURED_FILE}; {ENV_AUTO_MEASURE}=0 turns it off)")


def render(status: dict) -> str:
    lines = [f"torch {status['torch']}  CUDA {status['cuda'] or '-'}  cuDNN {status['cudnn'] or '-'}", ""]
    width = max(len(row["name"]) for row in status["backends"])
    lines.append(f"{'backend':<{width}}  {'kind':<9}  {'ready':<5}  {'version':<18}  why not")
    for row in status["backends"]:
        kind = "sparse" if row["sparse"] else "quantized" if row["quantized"] else "exact"
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
        lines.append("  " + _source_line(device.get("auto_source", {})))
        lines.append("  typical calls:")
        for choice in device["typical"]:
            predicted = ", ".join(f"{name} {us:.0f}" for name, us in choice.get("predicted_us", {}).items())
            line = f"    {choice['shape']:<24} -> {choice['backend']}"
            lines.append(f"{line:<62} predicted µs: {predicted}" if predicted else line)
    lines += render_parallel(status["parallel"])
    return "\n".join(lines)


def main(as_json: bool = False, out: TextIO = sys.stdout) -> int:
    status = machine_status()
    out.write((json.dumps(status, indent=2) if as_json else render(status)) + "\n")
    return 0
