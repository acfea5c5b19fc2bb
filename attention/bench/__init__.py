"""`python -m attention bench`: kernel speed, memory and accuracy on model-shaped calls."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import torch

from ..shapes import MODEL_SHAPES, QUICK_KEYS, ModelShape, by_key
from .report import markdown, write_all
from .runner import run

log = logging.getLogger(__name__)

# On a CPU the real shapes take minutes per call; `--quick` shrinks them by this factor.
CPU_SHRINK = 16


def _shrunk(shape: ModelShape) -> ModelShape:
    return dataclasses.replace(shape, label=shape.label + " /16", seq_q=max(64, shape.seq_q // CPU_SHRINK),
                               seq_k=max(16, shape.seq_k // CPU_SHRINK))


def main(quick: bool = False, shapes: Optional[list[str]] = None, backends: Optional[list[str]] = None,
         out_dir: Optional[str] = None, dtype_name: Optional[str] = None, reps: int = 20,
         budget_s: float = 10.0) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[dtype_name]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    selected = [by_key(k) for k in shapes] if shapes else [
        s for s in MODEL_SHAPES if not quick or s.key in QUICK_KEYS]
    if device.type == "cpu":
        selected = [_shrunk(s) for s in selected]
        log.info("no GPU: shapes shrunk %dx in sequence length", CPU_SHRINK)
    if quick:
        reps, budget_s = min(reps, 10), min(budget_s, 2.0)
    tuning_file = os.path.join(out_dir, "tuning.json") if out_dir else None
    rows = run(selected, device, dtype, backends=backends, reps=reps, budget_s=budget_s, tuning_file=tuning_file)
    print(markdown(rows))  # noqa: T201  (command-line output)
    if out_dir:
        title = f"Attention kernels vs SDPA default — {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}"
        for path in write_all(rows, out_dir, title):
            log.info("wrote %s", path)
    return 0


__all__ = ["main"]
