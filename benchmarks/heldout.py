"""`auto` against the fastest kernel on the held-out calls (attention/calibration_calls.py
HELD_OUT), every kernel and both `auto`s timed in one run, interleaved per call.

Rows per call, all in the same shuffled rounds: every tunable kernel available here that
can serve the call, `auto` with the rule table, `auto` with the cost model when --model is
given, and a second timing of SDPA and of each kernel an `auto` chose. The noise floor is
the widest spread of the timings of one kernel, the `auto` rows that ran it counted, and
each `auto` row is judged by the floor of the other rows (every_timing_floor, chosen
before run13); ratios whose distance from 1 is inside it are marked `~`. The pair floor
of runs 1-12 (a kernel with its repeat row, `auto` rows with each other) is printed beside
it, and the targets are judged by both.

Targets (issue 11): `auto` >= 0.97x the fastest kernel on every call and >= 0.99x in the
median; never below 0.98x SDPA; a miss inside the call's noise floor counts as met. The
target lines printed last have the form benchmarks/evaluate_cost_model.py prints, which
judges a model offline on this run's committed table.

With --table, the image shapes of the kernel table (attention/shapes.py) are timed in the
same run as a second list, judged the same way: the issue's other target is that `auto`
does no worse there than the rule table, and two runs on different days differ more than
the picks do (FA4 read 1.10x SDPA at SD1.5's level 1 in the kernel table's run, 0.74x to
1.07x in this script's four runs of 2026-12-02, heldout/run2/ to heldout/). The video
shapes are left out: every `auto` gives them the same quantized kernel, and they would
take most of the budget.

The `auto (model)`, `auto (calibrated)` and `auto (previous model)` rows are a model
alone: `auto` there never times a call. With --contested, `auto` as it ships is added for
the model and for the calibration: on a long call whose kernels the model cannot separate
(attention.cost_model.contested; benchmarks/contested.py judged the policy offline) those
kernels and SDPA are timed once first, before the rounds, and the fastest accurate one
serves. Each row has a measurement file of its own, so neither reuses the other's; the
one-time cost of each measurement is written as `contested_tuning_ms`, and what it saw
as `contested_decisions`, per row.

Usage:
  python benchmarks/heldout.py --out DIR [--model attention/cost_models/sm90.json]
                               [--calibration FILE] [--previous-model FILE] [--contested] [--table]
                                                                                      (GPU, <= 260 s)
  python benchmarks/heldout.py --out DIR --smoke [--model FILE]                      (CPU, tiny, sdpa only)
  python benchmarks/heldout.py --out DIR --from-json RUN/heldout.json                (no measuring: rejudge)
Writes DIR/heldout.json and DIR/heldout.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from attention import registry  # noqa: E402
from attention.bench.report import environment  # noqa: E402
from attention.calibrate import (BASELINE, CallTiming, kernel_names, measure_grid, repeat_label,  # noqa: E402
                                 timing_from_json)
from attention.calibration_calls import HELD_OUT, Call  # noqa: E402
from attention.call import MASK_NONE  # noqa: E402
from attention.cost_model import load  # noqa: E402
from attention.cost_store import parse_file  # noqa: E402
from attention.tuning_store import fingerprint  # noqa: E402
from attention.dispatch import Dispatcher  # noqa: E402
from attention.priority import load_table  # noqa: E402
from attention.shapes import MODEL_SHAPES  # noqa: E402
from attention.tuning import MEASURED, Tuner  # noqa: E402
from evaluate_cost_model import TARGET_MEDIAN, TARGET_VS_SDPA, TARGET_WORST, inside, target_line  # noqa: E402

AUTO_RULES = "auto (rules)"
AUTO_MODEL = "auto (model)"
AUTO_CALIBRATED = "auto (calibrated)"
AUTO_PREVIOUS = "auto (previous model)"
AUTO_CONTESTED = "auto (model, contested measured)"
AUTO_CALIBRATED_CONTESTED = "auto (calibrated, contested measured)"
AUTOS = (AUTO_RULES, AUTO_MODEL, AUTO_CALIBRATED, AUTO_PREVIOUS, AUTO_CONTESTED, AUTO_CALIBRATED_CONTESTED)
SMOKE_SHRINK = 32
# Long calls (5 ms and more, screened: attention.calibrate.rounds) get twice the rounds:
# after 20, the rows of one kernel read a median 2% and up to 6% apart on the video calls
# (heldout/run10 to run12), as wide as the FA4/Sage 2 fp8 differences judged there. With
# 40 (run13): a median 1.2% and up to 3.4%, for 17-37 s more than runs 10-12 took.
LONG_REPS, LONG_CALL_BUDGET_S = 40, 12.0
# The kernel table's image shapes, timed with --table (bf16, as the table was).
TABLE_KEYS = ("sd15_l1", "sd15_l2", "sd15_l3", "sdxl_l1", "sdxl_l2", "sdxl_cross", "flux_1024", "qwen_1328")


def table_calls() -> list[Call]:
    """The kernel table's image shapes as calls to time (keys prefixed `table_`)."""
    shapes = {shape.key: shape for shape in MODEL_SHAPES}
    return [Call(f"table_{key}", s.batch, s.heads, s.seq_q, s.seq_k, s.head_dim, layout=s.layout, label=s.label)
            for key in TABLE_KEYS for s in (shapes[key],)]


def every_timing_floor(timing: CallTiming, leave_out: Optional[str] = None) -> Optional[float]:
    """The widest spread of the timings of one way of running the call: 1 - fastest/slowest
    over a kernel's row, its repeat row and every `auto` row that ran it (on a masked
    call the auto rows served the keys trimmed, so they group only with each other),
    without the row `leave_out`.

    The held-out floor from run13 on (chosen before that run, 2026-12-03): an `auto`
    row that ran kernel X is a timing of X, plus the dispatch path that
    benchmarks/overhead.py bounds on its own (<= 1.02 from 4096 tokens). Each `auto`
    row is judged by the floor of the other rows (`leave_out`), so that its own time
    never widens the floor it is judged by. The rule of runs 1-12 (`timing.noise_floor`,
    kept beside it as `pair_floor`) pairs a kernel with its repeat row and `auto` rows
    with each other, never an `auto` row with the kernel it ran: in run12 the `auto`
    rows that ran Sage 2 fp8 on Wan 2.2 5B 121f took 0.5-5.7% longer than the kernel's
    own row, the fastest of the call, and the kernel and its repeat read 3.2% apart."""
    groups: dict[str, list[float]] = {}
    for name, us in timing.times_us.items():
        if name == leave_out:
            continue
        if name in registry.names():
            groups.setdefault(name, []).append(us)
        elif name in timing.chose:
            way = timing.chose[name] if timing.call.mask == MASK_NONE else f"{timing.chose[name]} (keys trimmed)"
            groups.setdefault(way, []).append(us)
        else:
            kernel = next((n for n in registry.names() if repeat_label(n) == name), None)
            if kernel is not None:
                groups.setdefault(kernel, []).append(us)
    spreads = [1.0 - min(times) / max(times) for times in groups.values() if len(times) > 1 and min(times) > 0]
    return max(spreads) if spreads else None


def verdict(timing: CallTiming) -> dict:
    """Per call: the fastest way to run it, each auto's choice and ratios, the noise floor
    (every_timing_floor; `pair_floor`: the rule of runs 1-12, timing.noise_floor).

    On a masked call the kernel columns keep the mask, while `auto` serves key padding
    with the keys trimmed (mask_serving.py): each auto row is also a way to run the call
    ("KERNEL (keys trimmed)"), and the fastest counts it."""
    kernels = {n: us for n, us in timing.times_us.items() if n in registry.names()}
    exact = {n: us for n, us in kernels.items() if registry.get(n).exact}
    ways = dict(kernels)
    if timing.call.mask != MASK_NONE:
        for label, chose in timing.chose.items():
            trimmed = f"{chose} (keys trimmed)"
            ways[trimmed] = min(ways.get(trimmed, float("inf")), timing.times_us[label])
    fastest = min(ways, key=ways.get)
    row = {"call": timing.call.key, "label": timing.call.label or timing.call.key, "sdpa_us": kernels.get(BASELINE),
           "fastest": fastest, "fastest_exact": min(exact, key=exact.get) if exact else None,
           "noise_floor": every_timing_floor(timing), "pair_floor": timing.noise_floor, "autos": {}}
    for label in AUTOS:
        us = timing.times_us.get(label)
        if us is None:
            continue
        row["autos"][label] = {"chose": timing.chose.get(label), "us": us, "vs_fastest": ways[fastest] / us,
                               "vs_sdpa": kernels[BASELINE] / us if BASELINE in kernels else None,
                               "noise_floor": every_timing_floor(timing, leave_out=label)}
    return row


def summary(rows: list[dict]) -> dict:
    """Per auto: worst and median vs the fastest, worst vs SDPA, and whether the targets
    are met, a miss inside the call's noise floor counting as met (the same rule as
    benchmarks/evaluate_cost_model.py)."""
    out = {}
    for label in AUTOS:
        picked = [r for r in rows if label in r["autos"]]
        if not picked:
            continue
        vs_fastest = [r["autos"][label]["vs_fastest"] for r in picked]
        vs_sdpa = [r["autos"][label]["vs_sdpa"] for r in picked if r["autos"][label]["vs_sdpa"] is not None]
        out[label] = {"calls": len(picked), "worst_vs_fastest": min(vs_fastest),
                      "median_vs_fastest": statistics.median(vs_fastest), "worst_vs_sdpa": min(vs_sdpa),
                      "targets_met": _met(picked, label, every_timing=True),
                      "targets_met_pair_floor": _met(picked, label, every_timing=False)}
    return out


def _met(rows: list[dict], label: str, every_timing: bool) -> bool:
    """The three held-out targets for one auto, a miss inside the floor counting as met:
    the floor of every other timing (every_timing_floor) or the pair floor of runs 1-12."""
    picks = [(r["autos"][label], r["autos"][label].get("noise_floor") if every_timing else r.get("pair_floor"))
             for r in rows]
    below = [a for a, noise in picks if a["vs_fastest"] < TARGET_WORST and not inside(a["vs_fastest"], noise)]
    below_sdpa = [a for a, noise in picks
                  if a["vs_sdpa"] is not None and a["vs_sdpa"] < TARGET_VS_SDPA and not inside(a["vs_sdpa"], noise)]
    return not below and not below_sdpa and statistics.median(a["vs_fastest"] for a, _ in picks) >= TARGET_MEDIAN


def versus_rules(rows: list[dict]) -> list[str]:
    """Per auto that is not the rule table: the calls where it is slower or faster than the
    rules outside the call's noise floor (the table's target is no worse than the rules)."""
    lines = []
    for label in AUTOS[1:]:
        slower = [r["label"] for r in rows if label in r["autos"] and AUTO_RULES in r["autos"]
                  and _against_rules(r, label) < 1 and not inside(_against_rules(r, label), r["noise_floor"])]
        faster = [r["label"] for r in rows if label in r["autos"] and AUTO_RULES in r["autos"]
                  and _against_rules(r, label) > 1 and not inside(_against_rules(r, label), r["noise_floor"])]
        if any(label in r["autos"] for r in rows):
            lines.append(f"- {label} against the rules outside the noise: slower on {', '.join(slower) or 'none'}; "
                         f"faster on {', '.join(faster) or 'none'}")
    return lines


def _against_rules(row: dict, label: str) -> float:
    """The rules' time over this auto's (above 1: this auto is faster)."""
    return row["autos"][AUTO_RULES]["us"] / row["autos"][label]["us"]


def _floor(noise: Optional[float]) -> str:
    return "–" if noise is None else f"{noise:.3f}"


def _ratio(value: Optional[float], noise: Optional[float]) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" + (" ~" if inside(value, noise) else "")


def markdown(timings: list[CallTiming], rows: list[dict], totals: dict) -> str:
    kernels = [n for n in registry.names() if any(n in t.times_us for t in timings)]
    lines: list[str] = ["Speed relative to SDPA (higher is faster) per kernel; `~`: inside the call's noise floor "
             "(1 - fastest / slowest of the timings of one kernel in the same rounds: its row, its repeat row "
             "(SDPA, and each kernel an `auto` chose) and the `auto` rows that ran it; every_timing_floor). "
             "`pair floor`: the rule of runs 1-12 (a kernel with its repeat row, `auto` rows with each other).", "",
             "| call | SDPA µs | noise floor | pair floor | " + " | ".join(k for k in kernels if k != BASELINE) + " |",
             "|---|---|---|---|" + "---|" * (len(kernels) - 1)]
    for timing, row in zip(timings, rows):
        base = timing.times_us.get(BASELINE)
        noise = row["noise_floor"]
        cells = [_ratio(base / timing.times_us[k], noise) if base and k in timing.times_us else "–"
                 for k in kernels if k != BASELINE]
        floors = f"{_floor(noise)} | {_floor(row['pair_floor'])}"
        lines.append(f"| {row['label']} | {base:.1f} | {floors} | " + " | ".join(cells) + " |"
                     if base else f"| {row['label']} | – | {floors} | " + " | ".join(cells) + " |")
    lines += ["", "Each `auto` row against the floor of the call's other timings (its own row left out):", "",
              "| call | fastest | auto | chose | floor without this row | vs fastest | vs SDPA |",
              "|---|---|---|---|---|---|---|"]
    for row in rows:
        for label, a in row["autos"].items():
            floor = a.get("noise_floor")
            lines.append(f"| {row['label']} | {row['fastest']} | {label} | {a['chose']} | {_floor(floor)} | "
                         f"{_ratio(a['vs_fastest'], floor)} | {_ratio(a['vs_sdpa'], floor)} |")
    lines += ["", "| auto | calls | worst vs fastest | median vs fastest | worst vs SDPA "
                  "| targets (0.97 / 0.99 / 0.98) | judged by the pair floor |", "|---|---|---|---|---|---|---|"]
    for label, s in totals.items():
        lines.append(f"| {label} | {s['calls']} | {s['worst_vs_fastest']:.3f} | {s['median_vs_fastest']:.3f} | "
                     f"{s['worst_vs_sdpa']:.3f} | {_met_text(s['targets_met'])} | "
                     f"{_met_text(s.get('targets_met_pair_floor'))} |")
    return "\n".join(lines) + "\n"


def _met_text(met: Optional[bool]) -> str:
    return "–" if met is None else "met" if met else "MISSED"


def _calibrated_model(path: str, device: torch.device):
    with open(path, encoding="utf-8") as handle:
        machines = parse_file(handle.read())
    machine = fingerprint(device)
    for entry in machines:
        if entry["fingerprint"] == machine:
            return entry["model"]
    raise SystemExit(f"{path} holds no calibration for this machine: run python -m attention calibrate --file {path}")


def write(out: str, timings: list[CallTiming], facts: dict) -> None:
    """heldout.json (the timings, the verdicts, `facts` about the run) and heldout.md,
    printed with the target lines."""
    held = [t for t in timings if not t.call.key.startswith("table_")]
    table = [t for t in timings if t.call.key.startswith("table_")]
    rows, table_rows = [verdict(t) for t in held], [verdict(t) for t in table]
    totals, table_totals = summary(rows), summary(table_rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "heldout.json"), "w", encoding="utf-8") as handle:
        json.dump({**facts, "summary": totals, "rows": rows, "timings": [t.to_json() for t in held],
                   "table": {"summary": table_totals, "rows": table_rows, "timings": [t.to_json() for t in table]}},
                  handle, indent=1)
    text = "# Held-out calls\n\n" + markdown(held, rows, totals) + _measuring_cost(facts.get("contested_tuning_ms"))
    if table:
        text += ("\n# The kernel table's image shapes, in the same run\n\n" + markdown(table, table_rows, table_totals)
                 + "\n" + "\n".join(versus_rules(table_rows)) + "\n")
    with open(os.path.join(out, "heldout.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)  # noqa: T201  (command-line output)
    for title, sums in (("held-out", totals), ("table", table_totals)):
        for label, s in sums.items():
            print(target_line(title, label.removeprefix("auto (").rstrip(")"), s))  # noqa: T201


def _measuring_cost(spent: Optional[dict]) -> str:
    """What the contested calls' one-time measurements cost, per row (a run of 2026-12-03
    or later) or for its one contested row (earlier runs)."""
    if not spent:
        return ""
    per_row = spent if all(isinstance(v, dict) for v in spent.values()) else {AUTO_CONTESTED: spent}
    lines = ["", "One-time measurements of contested calls (each before its call's rounds, once per signature):", ""]
    for label, by_call in per_row.items():
        lines.append(f"- {label}: {len(by_call)} call{'s' * (len(by_call) != 1)}, "
                     f"{sum(by_call.values()) / 1e3:.2f} s in all")
    return "\n".join(lines) + "\n"


def rejudge(path: str, out: str) -> int:
    """A committed run's tables again from its timings, with today's verdict rules (the
    noise floor, the targets): the measurements are untouched."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    timings = [timing_from_json(row) for row in data["timings"] + data.get("table", {}).get("timings", [])]
    facts = {key: data[key] for key in ("environment", "model", "calibration", "previous_model",
                                        "contested_tuning_ms", "contested_decisions", "elapsed_s", "left_out",
                                        "smoke")
             if key in data}
    write(out, timings, {**facts, "rejudged_from": os.path.basename(path)})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", help="a fitted cost-model file: adds the `auto (model)` row")
    parser.add_argument("--previous-model", help="the cost-model file a refit replaces: adds the "
                                                 "`auto (previous model)` row, in the same rounds")
    parser.add_argument("--contested", action="store_true",
                        help="adds `auto` as it ships, for the model and the calibration: the kernels the model "
                             "cannot separate on a long call timed once first (attention.cost_model.contested)")
    parser.add_argument("--calibration", help="a file `python -m attention calibrate --file` wrote on this "
                                              "machine: adds the `auto (calibrated)` row")
    parser.add_argument("--budget-s", type=float, default=170.0)
    parser.add_argument("--smoke", action="store_true", help="CPU proof run: tiny shapes, sdpa only")
    parser.add_argument("--table", action="store_true", help="also the kernel table's image shapes, in the same run")
    parser.add_argument("--from-json", help="no measuring: the tables of a heldout.json again (rejudge)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.from_json:
        return rejudge(args.from_json, args.out)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    held_out, table_shapes = list(HELD_OUT), table_calls() if args.table else []
    names = kernel_names(device)
    # 7 rounds per call read the same kernel up to 7% apart in two rows of one run
    # (heldout/run2/heldout.md, Qwen-Image-Edit); the 27 calls took 58 s of 170.
    reps, call_budget = 20, 6.0
    if args.smoke:
        held_out, table_shapes = held_out[::4], table_shapes[:2]
        names, reps, call_budget = [BASELINE], 3, 1.0
    elif device.type != "cuda":
        parser.error("no GPU here: run with --smoke for the CPU proof run")
    # `auto` here is the rule table or the model alone: no auto_tuned decisions saved on
    # this machine by earlier runs, no earlier calibration.
    scratch = tempfile.mkdtemp(prefix="heldout-")
    os.environ["ATTENTION_BACKENDS_TUNING_FILE"] = os.path.join(scratch, "tuning.json")
    os.environ["ATTENTION_BACKENDS_CALIBRATION_FILE"] = os.path.join(scratch, "calibration.json")
    model = load(args.model, registry.names()) if args.model else None
    extra = {AUTO_RULES: lambda: Dispatcher(registry.AUTO, auto_table=load_table())}
    models = {}
    if model is not None:
        models[AUTO_MODEL] = model
    if args.previous_model:
        models[AUTO_PREVIOUS] = load(args.previous_model, registry.names())
    if args.calibration:
        models[AUTO_CALIBRATED] = _calibrated_model(args.calibration, device)
    for label, row_model in models.items():
        extra[label] = lambda m=row_model: Dispatcher(registry.AUTO, cost_model=m, measure_contested=False)
    measurers: dict[str, Tuner] = {}
    if args.contested:
        if model is None:
            parser.error("--contested needs --model")
        contested_rows = {AUTO_CONTESTED: AUTO_MODEL, AUTO_CALIBRATED_CONTESTED: AUTO_CALIBRATED}
        for label, alone in contested_rows.items():
            if alone in models:
                # A file per row: one row must not reuse the other's measurements.
                measurers[label] = Tuner(os.path.join(scratch, f"contested-{len(measurers)}.json"))
                extra[label] = lambda m=models[alone], t=measurers[label]: Dispatcher(registry.AUTO, cost_model=m,
                                                                                      measurer=t)

    def time_one(call, device, names, **kwargs):
        from attention.calibrate import time_call
        return time_call(call, device, names, extra=extra, repeat_chosen=True, long_reps=LONG_REPS,
                         long_budget_s=LONG_CALL_BUDGET_S, **kwargs)

    calls = held_out + table_shapes
    if args.smoke:
        calls = [dataclasses.replace(c.shrunk(SMOKE_SHRINK), dtype="fp32") for c in calls]
    started = time.perf_counter()
    timings, left_out = measure_grid(calls, device, names, budget_s=args.budget_s, reps=reps,
                                     call_budget_s=call_budget, time_one=time_one, label="held-out")
    elapsed = time.perf_counter() - started
    write(args.out, timings, {"environment": environment(), "model": args.model, "calibration": args.calibration,
                              "previous_model": args.previous_model,
                              "contested_tuning_ms": {label: {d.key: d.tuning_ms for d in tuner.decisions
                                                              if d.source == MEASURED}
                                                      for label, tuner in measurers.items()},
                              # What each measurement saw (times, errors, its noise floor): a
                              # rule on top of it can be judged offline against the rounds.
                              "contested_decisions": {label: {d.key: d.to_json() for d in tuner.decisions}
                                                      for label, tuner in measurers.items()},
                              "elapsed_s": round(elapsed, 1), "left_out": left_out, "smoke": args.smoke})
    logging.info("%d calls in %.0f s (%d left out); wrote %s", len(timings), elapsed, len(left_out), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
