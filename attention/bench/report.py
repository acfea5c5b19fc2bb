"""Benchmark output: JSON (everything), a Markdown table and a PNG chart."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
from typing import Optional

import torch

from ..shapes import MODEL_SHAPES
from .runner import AUTO_ROW, Row, auto_verdicts

log = logging.getLogger(__name__)

_PACKAGES = ("torch", "triton", "sageattention", "flash-attn", "flash_attn_3", "flash-attn-4", "nvidia-cutlass-dsl",
             "xformers", "comfy-kitchen")


def environment() -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    env = {"python": platform.python_version(), "packages": versions, "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def to_json(rows: list[Row], extra: Optional[dict] = None) -> dict:
    return {"environment": environment(), "rows": [dataclasses.asdict(r) for r in rows],
            "auto": auto_verdicts(rows), **(extra or {})}


def _label(key: str) -> str:
    return next((s.label for s in MODEL_SHAPES if s.key == key), key)


def markdown(rows: list[Row]) -> str:
    """One table of speed relative to SDPA default (time in ms for SDPA), one for auto."""
    shapes = list(dict.fromkeys(r.shape for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    cell = {(r.shape, r.backend): r for r in rows}
    header = "| shape | SDPA ms | " + " | ".join(b for b in backends if b != "sdpa") + " |"
    lines = [header, "|" + "---|" * (len(backends) + 1)]
    for shape in shapes:
        base = cell.get((shape, "sdpa"))
        parts = [_label(shape), f"{base.ms:.3f}" if base and base.ms else "–"]
        for backend in backends:
            if backend == "sdpa":
                continue
            r = cell.get((shape, backend))
            if r is None or r.status == "unsupported":
                parts.append("–")
            elif r.status == "failed":
                parts.append("failed")
            else:
                text = f"{r.speedup:.2f}" if r.speedup else f"{r.ms:.3f} ms"
                if backend == AUTO_ROW and r.chose:
                    text += f" ({r.chose})"
                parts.append(text)
        lines.append("| " + " | ".join(parts) + " |")
    verdicts = auto_verdicts(rows)
    if verdicts:
        lines += ["", "| shape | auto chose | vs fastest | vs fastest exact | vs SDPA |", "|---|---|---|---|---|"]
        for shape, v in verdicts.items():
            exact = f"{v['auto_vs_fastest_exact']:.3f} ({v['fastest_exact']})" if v["fastest_exact"] else "–"
            lines.append(f"| {_label(shape)} | {v['auto_chose']} | {v['auto_vs_fastest']:.3f} ({v['fastest']}) | "
                         f"{exact} | {v['auto_vs_sdpa']:.3f} |")
    errors = [r for r in rows if r.error and r.backend != AUTO_ROW]
    if errors:
        lines += ["", "| shape | backend | rel. L1 | cosine | max abs | non-finite | extra MiB | TFLOP/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in errors:
            extra = f"{r.extra_mib:.0f}" if r.extra_mib is not None else "–"
            lines.append(f"| {_label(r.shape)} | {r.backend} | {r.error['rel_l1']:.4f} | {r.error['cosine']:.6f} | "
                         f"{r.error['max_abs']:.3g} | {r.error['nonfinite']} | {extra} | {r.tflops:.3g} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[Row], path: str, title: str) -> bool:
    """Grouped bars of speed relative to SDPA default per shape. False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no chart written")
        return False
    shapes = list(dict.fromkeys(r.shape for r in rows))
    backends = [b for b in dict.fromkeys(r.backend for r in rows)
                if any(r.speedup for r in rows if r.backend == b)]
    width = 0.8 / max(1, len(backends))
    fig, ax = plt.subplots(figsize=(max(10, 1.2 * len(shapes)), 5.5))
    for i, backend in enumerate(backends):
        values = [next((r.speedup or 0 for r in rows if r.shape == s and r.backend == backend), 0) for s in shapes]
        ax.bar([x + i * width for x in range(len(shapes))], values, width, label=backend,
               edgecolor="black" if backend == AUTO_ROW else None, linewidth=1.2)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(shapes))])
    ax.set_xticklabels([_label(s) for s in shapes], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("speed vs SDPA default (higher is faster)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(rows: list[Row], out_dir: str, title: str, extra: Optional[dict] = None) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    json_path = os.path.join(out_dir, "kernels.json")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(to_json(rows, extra), handle, indent=1)
    written.append(json_path)
    md_path = os.path.join(out_dir, "kernels.md")
    with open(md_path, "w", encoding="utf-8") as handle:
        handle.write(markdown(rows))
    written.append(md_path)
    png_path = os.path.join(out_dir, "chart.png")
    if chart(rows, png_path, title):
        written.append(png_path)
    return written

