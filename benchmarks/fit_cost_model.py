"""Fit the cost model to a measured grid and write it with its residuals.

Usage:
  python benchmarks/fit_cost_model.py DIR/cost_grid.json [MORE/cost_grid.json ...] --out attention/cost_models/sm90.json
Writes the model file, and beside the first grid (or in --residuals-dir) residuals.md and
residuals.json: each kernel's fit summary and predicted/measured per grid call. Several
grids (one GPU class; later ones measured with cost_grid.py --only) are fitted as one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from attention import registry  # noqa: E402
from attention.calibrate import fit_timings, timing_from_json  # noqa: E402
from attention.cost_fit import residual_table  # noqa: E402
from attention.cost_model import CostModel, save  # noqa: E402
from attention.cost_residuals import leave_one_out  # noqa: E402


def read_grids(paths: list[str]) -> tuple[dict, list]:
    """The first grid's facts and every grid's timings; a call measured in two grids is
    kept from the later one, and grids of another GPU class are refused."""
    grids = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            grids.append(json.load(handle))
    by_key = {}
    for path, grid in zip(paths, grids):
        if grid["gpu_class"] != grids[0]["gpu_class"]:
            raise SystemExit(f"{path} was measured on {grid['gpu_class']}, {paths[0]} on {grids[0]['gpu_class']}: "
                             "fit one GPU class at a time")
        for row in grid["rows"]:
            timing = timing_from_json(row)
            by_key[timing.call.key] = timing
    return grids[0], list(by_key.values())


def _short(path: str) -> str:
    """A grid file named by its folder and name (where it was measured is in the file)."""
    return os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))


def correction_text(model: CostModel) -> str:
    """The residual correction's settings and its leave-one-out error (cost_residuals.py)."""
    c = model.correction
    if c is None:
        return "\nNo residual correction: no GPU-bound grid call.\n"
    return (f"\nResidual correction (attention/cost_residuals.py), chosen by leave-one-out on the "
            f"{c.loo['points']:.0f} GPU-bound calls above: token width {c.scale_tokens}, batch·heads width "
            f"{c.scale_heads}, shrink {c.shrink}. Mean |log(measured / predicted)| of those calls: "
            f"{c.loo['mean_abs_log_error']:.3f} by the form alone (fitted on all of them), "
            f"{c.loo['leave_one_out']:.3f} with the correction, each call's from the others' residuals.\n")


# Calls with this many query and key tokens are where quantized kernels and FA4 trade places.
LONG_FROM_TOKENS = 8192


def ratio_errors(model: CostModel, quantized: set[str]) -> list[tuple[float, str, str, tuple]]:
    """On each grid call where a quantized and an exact kernel are both GPU-bound: the
    leave-one-out error of their predicted time ratio (cost_residuals.leave_one_out), as
    (|log error|, quantized, exact, position), largest first."""
    if model.correction is None:
        return []
    rows = []
    for where, errors in leave_one_out(model.correction).items():
        for q in sorted(set(errors) & quantized):
            rows += [(abs(errors[q] - errors[e]), q, e, where) for e in sorted(set(errors) - quantized)]
    return sorted(rows, key=lambda r: r[0], reverse=True)


def on_long_calls(rows: list, long_from: int = LONG_FROM_TOKENS) -> list:
    """The ratio_errors rows of calls with `long_from` or more query and key tokens."""
    return [r for r in rows if r[3][1] >= math.log(long_from) and r[3][2] >= math.log(long_from)]


def quantile_ratio(rows: list, q: float) -> float:
    """The q-quantile of the ratio errors of `rows`, as a fraction (0.05: 5%)."""
    if not rows:
        raise ValueError("no ratio errors: the model has no residual correction with a quantized and an exact "
                         "kernel on the same calls")
    values = sorted(r[0] for r in rows)
    return math.exp(values[min(len(values) - 1, int(q * len(values)))]) - 1


def resolution_text(model: CostModel, quantized: set[str]) -> str:
    """How close a decision between a quantized and an exact kernel the fit can make (see
    ratio_errors). A predicted gap inside it is a guess."""
    rows = ratio_errors(model, quantized)
    if not rows:
        return ""

    def summary(selected: list) -> str:
        return (f"{len(selected)} pair{'s' * (len(selected) != 1)}, median {quantile_ratio(selected, 0.5):.1%}, "
                f"p90 {quantile_ratio(selected, 0.9):.1%}")

    long = on_long_calls(rows)
    text = ("\nHow close a decision the fit can make: the leave-one-out error of the predicted time ratio of "
            "a quantized and an exact kernel on the same GPU-bound grid call: "
            f"{summary(rows)}; with {LONG_FROM_TOKENS} or more query and key tokens (where quantized kernels and "
            f"FA4 trade places) {summary(long) if long else 'none'}. The largest of those:\n\n"
            "| quantized | exact | B·H | Nq | Nk | head dim | ratio error |\n|---|---|---|---|---|---|---|\n")
    for error, q, e, where in long[:8]:
        text += (f"| {q} | {e} | {round(math.exp(where[0]))} | {round(math.exp(where[1]))} | "
                 f"{round(math.exp(where[2]))} | {where[3]} | {math.exp(error) - 1:.1%} |\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grids", nargs="+", help="cost_grid.json files from benchmarks/cost_grid.py")
    parser.add_argument("--out", required=True, help="the model file to write")
    parser.add_argument("--residuals-dir", help="where residuals.md/json go (default: beside the grid file)")
    parser.add_argument("--steps", type=int, help="optimizer steps per kernel (default: the library's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The fit is many small tensor ops: one thread runs them fastest, on a busy machine most of all.
    torch.set_num_threads(1)
    grid, timings = read_grids(args.grids)
    capability = tuple(grid["capability"]) if grid.get("capability") else None
    model, fits = fit_timings(timings, gpu_class=grid["gpu_class"], gpu=grid["gpu"], sms=grid["sms"],
                              capability=capability, device_type="cuda" if capability else "cpu",
                              steps=args.steps)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save(model, args.out)
    folder = args.residuals_dir or os.path.dirname(os.path.abspath(args.grids[0]))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "residuals.md"), "w", encoding="utf-8") as handle:
        handle.write(f"# Cost model fit: {grid['gpu']} ({grid['gpu_class']}), {len(timings)} calls "
                     f"({', '.join(_short(p) for p in args.grids)})\n\n")
        handle.write(residual_table(fits, [t.call.key for t in timings]))
        handle.write(correction_text(model))
        handle.write(resolution_text(model, {n for n in model.kernels if registry.get(n).quantized}))
    with open(os.path.join(folder, "residuals.json"), "w", encoding="utf-8") as handle:
        json.dump({name: {"summary": fit.summary(), "residuals": fit.residuals} for name, fit in fits.items()},
                  handle, indent=1)
    for name, fit in fits.items():
        s = fit.summary()
        logging.info("%-32s %3d calls  rms log %.3f  median %.1f%%  max %.1f%%", name, s["points"],
                     s["rms_log_error"], 100 * s["median_abs_error"], 100 * s["max_abs_error"])
    logging.info("%s", correction_text(model).strip().replace("\n", " "))
    logging.info("wrote %s and residuals in %s", args.out, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
