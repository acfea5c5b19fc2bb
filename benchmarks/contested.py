"""Offline: what `auto` would gain by measuring the calls its cost model cannot separate.

The fit's leave-one-out error of a quantized/exact time ratio is ~9% at the p90 on long
grid calls (cost_model/residuals.md), and the held-out misses are gaps of 1.5-6.7%
between FA4 and Sage 2 fp8 there. The policy judged here: on a call whose SDPA is
predicted to take at least FROM_US, the kernels predicted within WITHIN of the best
prediction are "contested"; where two or more are, `auto` would time them once on the
user's machine (as `auto_tuned` does, for every kernel) and keep the faster.

Judged on the committed held-out runs (and the table shapes they timed in the same
rounds): the contested kernels' times in that run stand for the one-time measurement.
That measurement has its own noise, so the judgement is pessimistic: among contested
kernels within the call's noise floor of the fastest of them, the slowest is the pick.
WITHIN comes from the grid (the p90 above, and values around it), never from these runs.

The cost is estimated, not measured: the tuner times each contested kernel and SDPA (its
accuracy reference) once, then in `Limits.reps` interleaved rounds, with one of them twice;
each timing lasts the call or MEASUREMENT_MS (a short call is repeated until then),
whichever is longer: about (reps + 2) x the sum of those, once per call signature and
machine. It leaves out each kernel's first calls on a new shape and the sizing of each
timing, so it is a floor: the runs whose `auto` rows ran this policy (SHIPPED_POLICY_RUNS) are
listed with what their measurements took (contested_tuning_ms) beside the estimate.

Usage:
  python benchmarks/contested.py [--model attention/cost_models/sm90.json]
      [--results benchmarks/results/h200] [--out benchmarks/results/h200/cost_model]
Writes OUT/contested.md and OUT/contested.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention import registry  # noqa: E402
from attention.calibrate import BASELINE  # noqa: E402
from attention.call import CallSignature  # noqa: E402
from attention.cost_model import CONTESTED_FROM_US, CostModel, auto_order, contested as contested_of, load  # noqa: E402
from attention.measure import MEASUREMENT_MS  # noqa: E402
from attention.priority import model_candidates  # noqa: E402
from attention.tuning import Limits  # noqa: E402
from evaluate_cost_model import (TARGET_MEDIAN, TARGET_VS_SDPA, TARGET_WORST, EvalCall, decide,  # noqa: E402
                                 heldout_calls, inside, installed_only, measured)
from fit_cost_model import on_long_calls, quantile_ratio, ratio_errors  # noqa: E402

# The committed runs that timed every kernel the shipped model knows (Sage 2 built there).
RUNS = ("heldout.json", "run2/heldout.json", "run3/heldout.json", "run4/heldout.json", "run6/heldout.json",
        "run7/heldout.json", "run9/heldout.json", "run10/heldout.json", "run11/heldout.json", "run12/heldout.json",
        "run13/heldout.json")
FROM_US = (CONTESTED_FROM_US, 1000.0, 5000.0)
# The runs whose contested `auto` rows ran the shipped policy (contests from 100 µs, the
# kept choice timed twice): run10 and run11 contested from 5 ms, fewer and longer calls.
SHIPPED_POLICY_RUNS = ("run12/heldout.json", "run13/heldout.json")
MODEL_CONTESTED = "auto (model, contested measured)"  # heldout.py's row of the shipped model as it ships
WITHIN = (0.03, 0.05, 0.15)  # beside the grid's own p90 (added in main)


def contested_kernels(signature: CallSignature, model: CostModel, within: float,
                      from_us: float = FROM_US[1]) -> list[str]:
    """The kernels `auto` times on a call (cost_model.contested) at `within` and `from_us`."""
    predicted, copying, _ = model_candidates(signature, model)
    order = auto_order(predicted, model.margins(signature, predicted, copying))
    return contested_of(predicted, order, within, from_us)


def contested(call: EvalCall, model: CostModel, within: float, from_us: float) -> list[str]:
    """contested_kernels on a committed run's call, with that run's kernels as installed."""
    with installed_only(call.installed):
        return contested_kernels(call.signature, model, within, from_us)


def grid_resolution(model: CostModel) -> float:
    """The fit's p90 ratio error on long grid calls (fit_cost_model.ratio_errors)."""
    quantized = {n for n in model.kernels if registry.get(n).quantized}
    return round(quantile_ratio(on_long_calls(ratio_errors(model, quantized)), 0.9), 3)


def pessimistic_pick(call: EvalCall, names: list[str]) -> Optional[str]:
    """The contested kernel a one-time measurement could keep at worst: the slowest of those
    within the call's noise floor of the fastest (None if one was not timed in the run)."""
    times = {name: measured(call, name) for name in names}
    if any(us is None for us in times.values()):
        return None
    fastest = min(times.values())
    return max((name for name, us in times.items() if inside(fastest / us, call.noise_floor) or us == fastest),
               key=times.get)


def judge(calls: list[EvalCall], model: CostModel, within: float, from_us: float, reps: int) -> dict:
    """The policy's picks on `calls`, against the fastest kernel and SDPA, with its cost."""
    ratios, vs_sdpa, rows, cost_s, signatures = [], [], [], 0.0, set()
    for call in calls:
        fastest = min(call.times_us.values())
        names = contested(call, model, within, from_us)
        pick = pessimistic_pick(call, names) if names else None
        if pick is None:
            pick, names = decide(call, model), []
        us = measured(call, pick)
        if us is None:
            continue
        ratios.append(fastest / us)
        sdpa = measured(call, BASELINE)
        if sdpa is not None:
            vs_sdpa.append((sdpa / us, call.noise_floor))
        if names:
            signatures.add(call.key)
            cost_s += (reps + 2) * sum(max(measured(call, n) or 0.0, MEASUREMENT_MS * 1e3)
                                       for n in {*names, BASELINE}) / 1e6
        rows.append({"call": call.key, "label": call.label, "contested": names, "pick": pick,
                     "vs_fastest": fastest / us, "noise_floor": call.noise_floor})
    below = [r["call"] for r in rows if r["vs_fastest"] < TARGET_WORST and not inside(r["vs_fastest"], r["noise_floor"])]
    below_sdpa = [ratio for ratio, noise in vs_sdpa if ratio < TARGET_VS_SDPA and not inside(ratio, noise)]
    return {"calls": len(rows), "worst": min(ratios), "median": statistics.median(ratios),
            "worst_vs_sdpa": min(r for r, _ in vs_sdpa), "below_target_outside_noise": below,
            "below_sdpa_outside_noise": len(below_sdpa), "measured_calls": len(signatures),
            "cost_s": cost_s, "rows": rows,
            "targets_met": not below and not below_sdpa and statistics.median(ratios) >= TARGET_MEDIAN}


def measured_cost(results: str, report: dict, grid_p90: float) -> list[str]:
    """Markdown lines: per run of the shipped policy, its estimated one-time cost (both
    lists) beside what the model's contested `auto` row took to measure them."""
    lines = ["", "The shipped policy's one-time cost per run: estimated above (both lists), and measured by the "
             f"run's `{MODEL_CONTESTED}` row (the same model and policy, its own measurement file):", "",
             "| run | estimated s | measured s | measured / estimated |", "|---|---|---|---|"]
    for run in SHIPPED_POLICY_RUNS:
        with open(os.path.join(results, "heldout", run), encoding="utf-8") as handle:
            measured = sum(json.load(handle)["contested_tuning_ms"][MODEL_CONTESTED].values()) / 1e3
        estimated = sum(s["cost_s"] for section in report["runs"][run].values() for s in section
                        if s["within"] == grid_p90 and s["from_us"] == CONTESTED_FROM_US)
        lines.append(f"| {os.path.dirname(run)} | {estimated:.2f} | {measured:.2f} | {measured / estimated:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.path.join(ROOT, "attention", "cost_models", "sm90.json"))
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "h200"))
    parser.add_argument("--out", help="default: RESULTS/cost_model")
    args = parser.parse_args(argv)
    model = load(args.model, registry.names())
    grid_p90 = grid_resolution(model)
    reps = Limits().reps
    settings = [(0.0, float("inf"))] + [(w, f) for f in FROM_US for w in sorted({*WITHIN, grid_p90})]
    report = {"model": os.path.relpath(args.model, ROOT), "grid_p90": grid_p90, "runs": {}}
    lines = [f"# Measuring the calls the cost model cannot separate ({report['model']})", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"WITHIN {grid_p90:.1%} is the fit's p90 on long grid calls (residuals.md). Per run: worst and median "
             "of the fastest kernel, worst of SDPA, the calls measured and their estimated one-time cost. "
             "WITHIN 0 is the model alone (as shipped). contested.json has each call's pick for those two.", "",
             "| run | list | WITHIN | FROM µs | worst | median | worst vs SDPA | below 0.97 outside noise | "
             "measured calls | cost s | targets |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in RUNS:
        path = os.path.join(args.results, "heldout", run)
        for section in (None, "table"):
            calls = heldout_calls(path, section)
            if not calls:
                continue
            name = "held-out" if section is None else "table"
            for within, from_us in settings:
                s = judge(calls, model, within, from_us, reps)
                kept = s if within in (0.0, grid_p90) else {k: v for k, v in s.items() if k != "rows"}
                report["runs"].setdefault(run, {}).setdefault(name, []).append(
                    {"within": within, "from_us": from_us, **kept})
                lines.append(f"| {os.path.dirname(run) or 'heldout.json'} | {name} | {within:.1%} | "
                             f"{'–' if not within else f'{from_us:.0f}'} | {s['worst']:.3f} | {s['median']:.3f} | "
                             f"{s['worst_vs_sdpa']:.3f} | {', '.join(s['below_target_outside_noise']) or 'none'} | "
                             f"{s['measured_calls']} | {s['cost_s']:.2f} | {'met' if s['targets_met'] else 'MISSED'} |")
    lines += measured_cost(args.results, report, grid_p90)
    out = args.out or os.path.join(args.results, "cost_model")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "contested.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "contested.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    print("\n".join(lines))  # noqa: T201  (command-line output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
