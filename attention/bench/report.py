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
from .runner import AUTO_ROWS, Row, auto_verdicts

log = logging.getLogger(__name__)

_PACKAGES = ("torch", "triton", "sageattention", "flash-attn", "flash_attn_3", "flash-attn-4", "nvidia-cutlass-dsl",
             "xformers", "comfy-kitchen", "spas_sage_attn")


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


def write_result(out_dir: str, filename: str, rows: list[dict]) -> str:
    """A benchmark script's rows as JSON under `out_dir`, with the environment that made them."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, filename)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"environment": environment(), "rows": rows}, handle, indent=1)
    return path


def to_json(rows: list[Row], extra: Optional[dict] = None) -> dict:
    return {"environment": environment(), "rows": [dataclasses.asdict(r) for r in rows],
            "auto": auto_verdicts(rows), **(extra or {})}


def _label(key: str) -> str:
    return next((s.label for s in MODEL_SHAPES if s.key == key), key)


def within_noise(ratio: Optional[float], noise: Optional[float]) -> bool:
    """Whether a ratio is closer to 1 than two timings of one kernel in the same rounds."""
    return ratio is not None and noise is not None and abs(1.0 - ratio) <= noise


def _marked(text: str, ratio: Optional[float], noise: Optional[float]) -> str:
    return text + " ~" if within_noise(ratio, noise) else text


NOISE_NOTE = ("`noise floor`: |1 - ratio| of SDPA timed twice in the same rounds; `~` marks ratios closer to 1 "
              "than that (no measurable difference).")


def markdown(rows: list[Row]) -> str:
    """One table of speed relative to SDPA default (time in ms for SDPA), one for auto;
    each shape with its noise floor, and ratios inside it marked `~`."""
    shapes = list(dict.fromkeys(r.shape for r in rows))
    backends = list(dict.fromkeys(r.backend for r in rows))
    cell = {(r.shape, r.backend): r for r in rows}
    header = "| shape | SDPA ms | noise floor | " + " | ".join(b for b in backends if b != "sdpa") + " |"
    lines = [NOISE_NOTE, "", header, "|" + "---|" * (len(backends) + 2)]
    for shape in shapes:
        base = cell.get((shape, "sdpa"))
        noise = base.noise_floor if base else None
        parts = [_label(shape), f"{base.ms:.3f}" if base and base.ms else "–",
                 f"{noise:.3f}" if noise is not None else "–"]
        for backend in backends:
            if backend == "sdpa":
                continue
            r = cell.get((shape, backend))
            if r is None or r.status == "unsupported":
                parts.append("–")
            elif r.status == "failed":
                parts.append("failed")
            else:
                text = _marked(f"{r.speedup:.2f}", r.speedup, noise) if r.speedup else f"{r.ms:.3f} ms"
                if backend in AUTO_ROWS and r.chose:
                    text += f" ({r.chose})"
                parts.append(text)
        lines.append("| " + " | ".join(parts) + " |")
    noise_by_shape = {r.shape: r.noise_floor for r in rows if r.backend == "sdpa"}
    lines += _verdict_lines(auto_verdicts(rows), noise_by_shape)
    errors = [r for r in rows if r.error and r.backend not in AUTO_ROWS]
    if errors:
        lines += ["", "| shape | backend | rel. L1 | cosine | max abs | non-finite | extra MiB | TFLOP/s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in errors:
            extra = f"{r.extra_mib:.0f}" if r.extra_mib is not None else "–"
            lines.append(f"| {_label(r.shape)} | {r.backend} | {r.error['rel_l1']:.4f} | {r.error['cosine']:.6f} | "
                         f"{r.error['max_abs']:.3g} | {r.error['nonfinite']} | {extra} | {r.tflops:.3g} |")
    return "\n".join(lines) + "\n"


def _ratio(value: Optional[float], backend: Optional[str], noise: Optional[float] = None) -> str:
    return _marked(f"{value:.3f}", value, noise) + f" ({backend})" if value is not None and backend else "–"


def _verdict_lines(verdicts: dict, noise_by_shape: Optional[dict] = None) -> list[str]:
    """auto and auto_tuned per shape: choice, ratios to the fastest rows (marked `~` inside
    the shape's noise floor), tuning cost."""
    if not verdicts:
        return []
    lines = ["", "| shape | row | chose | noise floor | vs fastest | its choice's row vs fastest | vs fastest exact | "
                 "vs fastest eligible | vs SDPA | tuning ms (cold) | error in budget |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape, v in verdicts.items():
        noise = (noise_by_shape or {}).get(shape)
        for row_name in AUTO_ROWS:
            a = v.get(row_name)
            if a is None:
                continue
            tuning = f"{a['tuning_ms']:.0f}" if a["tuning_ms"] is not None else "–"
            choice = (_marked(f"{a['choice_vs_fastest']:.3f}", a["choice_vs_fastest"], noise)
                      if a.get("choice_vs_fastest") is not None else "–")
            floor = f"{noise:.3f}" if noise is not None else "–"
            lines.append(f"| {_label(shape)} | {row_name} | {a['chose']} | {floor} | "
                         f"{_ratio(a['vs_fastest'], v['fastest'], noise)} | "
                         f"{choice} | {_ratio(a['vs_fastest_exact'], v['fastest_exact'], noise)} | "
                         f"{_ratio(a['vs_fastest_eligible'], v['fastest_eligible'], noise)} | "
                         f"{_marked(format(a['vs_sdpa'], '.3f'), a['vs_sdpa'], noise)} | "
                         f"{tuning} | {'yes' if a['error_within_budget'] else 'NO'} |")
    return lines


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
               edgecolor="black" if backend in AUTO_ROWS else None, linewidth=1.2)
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

