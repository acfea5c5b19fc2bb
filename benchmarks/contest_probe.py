"""What `auto`'s one-time measurement of a contested call sees, against long rounds.

Run10 (heldout/run10/) found `auto`'s measurement choosing FA4 on Wan 2.1 1.3B 81f CFG,
twice, in two rows with their own files, where the held-out rounds read FA4 3.9% slower
than Sage 2 fp8 (floor 3.7%) and the model alone had kept Sage. This probe asks, per
held-out call whose kernels the shipped model cannot separate (cost_model.contested):

- measured as `auto` measures (tuning.measure_on_device: each kernel once, then
  interleaved rounds with SDPA twice), MEASUREMENTS times with different shuffles, at
  `Limits.reps` rounds and at twice that: what does each measurement read, and how wide
  is its own noise floor?
- the same kernels in LONG_REPS interleaved rounds, each timed twice: the call's
  reference times and their floor.

Offline, from the JSON, each decision rule is judged against the long rounds: the
fastest measured kernel wins (as run10 shipped), or the model's choice is kept unless
another kernel measured faster by more than the measurement's floor (`tuning.decide`'s
`keep`), or by more than a fixed margin as well. A rule's loss on a call is the long
rounds' time of its pick over the fastest there.

Usage:
  python benchmarks/contest_probe.py --out DIR [--model attention/cost_models/sm90.json]  (GPU, ~3 min)
  python benchmarks/contest_probe.py --out DIR --from-json DIR/contest_probe.json         (rejudge)
Writes DIR/contest_probe.json and DIR/contest_probe.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
import zlib
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from attention import registry  # noqa: E402
from attention.bench.inputs import call_form, make_qkv  # noqa: E402
from attention.bench.report import environment  # noqa: E402
from attention.calibration_calls import HELD_OUT, Call  # noqa: E402
from attention.call import MASK_NONE, describe_call  # noqa: E402
from attention.cost_model import SAFEST, load  # noqa: E402
from attention.dispatch import Contest, Dispatcher  # noqa: E402
from attention.measure import interleaved_median_ms  # noqa: E402
from attention.tuning import Limits, Measurement, decide, budget_for, measure_on_device  # noqa: E402

MEASUREMENTS = 5  # per number of rounds
LONG_REPS = 40
# Fixed margins judged beside the measurement's own floor.
MARGINS = (0.0, 0.02, 0.03, 0.05)
REPEAT = " (repeat)"


def contested_calls(model) -> list[tuple[Call, Contest]]:
    """The held-out calls (no mask: a masked call is contested after its keys are trimmed)
    on which `auto` with `model` would time kernels, with the contest it would hold."""
    out = []
    for call in HELD_OUT:
        if call.mask != MASK_NONE:
            continue
        dispatcher = Dispatcher(registry.AUTO, cost_model=model, measure_contested=True)
        contest = next((c for c in dispatcher.candidates(call.signature()) if isinstance(c, Contest)), None)
        if contest is not None:
            out.append((call, contest))
    return out


def probe_call(call: Call, contest: Contest, model, device: torch.device, limits: Limits,
               measurements_each: int = MEASUREMENTS, long_reps: int = LONG_REPS) -> dict:
    q, k, v = make_qkv(call.model_shape(), device, call.torch_dtype)
    form = call_form(call.model_shape())
    signature = describe_call(q, k, v, call.heads, None, **form)
    dispatcher = Dispatcher(registry.AUTO, cost_model=model, measure_contested=False)
    tensors = (q, k, v, None, None)
    runs = dispatcher.eligible(signature, tensors, only=frozenset((*contest.names, SAFEST)))
    ordered = {name: runs[name] for name in dict.fromkeys((SAFEST, *contest.names)) if name in runs}
    for run in ordered.values():
        run(q, k, v, None, None)  # compile outside every measurement
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    measurements = []
    for reps in (limits.reps, 2 * limits.reps):
        for attempt in range(measurements_each):
            seed = zlib.crc32(f"{call.key}/{reps}/{attempt}".encode())
            started = time.perf_counter()
            measured = measure_on_device(signature, tensors, ordered, SAFEST, dataclasses.replace(limits, reps=reps),
                                         limits.signature_s, seed=seed)
            measurements.append({
                "reps": reps, "seed": seed, "elapsed_s": round(time.perf_counter() - started, 3),
                "ms": {name: m.ms for name, m in measured.items()},
                "errors": {name: m.error for name, m in measured.items()},
                "repeat_ms": measured[SAFEST].repeat_ms,
            })
    fns = {}
    for name, run in ordered.items():
        fn = (lambda r=run: r(q, k, v, None, None))
        fns[name] = fn
        fns[name + REPEAT] = fn
    long = interleaved_median_ms(fns, device, warmup=2, reps=long_reps, budget_s=60.0, min_reps=long_reps,
                                 seed=zlib.crc32(call.key.encode()))
    return {"key": call.key, "label": call.label or call.key, "names": list(contest.names), "keep": contest.keep,
            "signature": signature.describe(), "measurements": measurements,
            "long_us": {name: ms * 1e3 for name, ms in long.items()}, "long_reps": long_reps}


def _floor(measurement: dict) -> Optional[float]:
    ms, again = measurement["ms"].get(SAFEST), measurement.get("repeat_ms")
    return None if not ms or not again else abs(1.0 - again / ms)


def long_times(row: dict) -> tuple[dict[str, float], float]:
    """Each kernel's long-rounds time (the mean of its two timings) and the widest gap
    between a kernel's two timings (the long rounds' floor)."""
    us = row["long_us"]
    names = [n for n in us if not n.endswith(REPEAT)]
    times = {n: (us[n] + us[n + REPEAT]) / 2 for n in names}
    floor = max(abs(1.0 - us[n + REPEAT] / us[n]) for n in names)
    return times, floor


def pick(row: dict, measurement: dict, rule: str, margin: float) -> Optional[str]:
    """What a rule picks from one measurement: "fastest", or "keep" (the model's choice kept
    unless beaten by more than max(the measurement's floor, margin))."""
    call_budget = budget_for(next(c for c in HELD_OUT if c.key == row["key"]).signature())
    measured = {name: Measurement(ms=ms, error=measurement["errors"].get(name))
                for name, ms in measurement["ms"].items()}
    if rule == "fastest":
        return decide(measured, call_budget)[0]
    floor = _floor(measurement) or 0.0
    return decide(measured, call_budget, keep=row["keep"], margin=max(floor, margin))[0]


def judge(rows: list[dict]) -> dict:
    """Per rule and number of rounds: each call's worst and mean loss against the long
    rounds' fastest kernel (its time over the picked kernel's)."""
    rules = [("fastest", 0.0)] + [("keep", m) for m in MARGINS]
    out: dict = {}
    for rule, margin in rules:
        name = "fastest wins" if rule == "fastest" else (
            "keep within the floor" + ("" if margin == 0 else f" or {margin:.0%}"))
        for reps in sorted({m["reps"] for row in rows for m in row["measurements"]}):
            per_call = {}
            for row in rows:
                times, _ = long_times(row)
                best = min(times.values())
                ratios = [best / times[p] for m in row["measurements"] if m["reps"] == reps
                          for p in (pick(row, m, rule, margin),) if p is not None]
                per_call[row["key"]] = {"worst": min(ratios), "mean": statistics.fmean(ratios),
                                        "picks": [pick(row, m, rule, margin) for m in row["measurements"]
                                                  if m["reps"] == reps]}
            out[f"{name} @ {reps} rounds"] = per_call
    return out


def markdown(rows: list[dict], judged: dict) -> str:
    long_reps = rows[0]["long_reps"] if rows else LONG_REPS
    lines = ["# What auto's one-time measurement of a contested call sees", "",
             f"Long rounds: {long_reps} interleaved rounds, each kernel timed twice (time: the mean of the two; "
             "floor: the widest gap between a kernel's two timings).", "",
             "| call | model's choice | long rounds: time / fastest | long floor |", "|---|---|---|---|"]
    for row in rows:
        times, floor = long_times(row)
        best = min(times.values())
        ratios = ", ".join(f"{n} {t / best:.3f}" for n, t in sorted(times.items(), key=lambda x: x[1]))
        lines.append(f"| {row['label']} | {row['keep']} | {ratios} | {floor:.3f} |")
    lines += ["", "Each measurement as `auto` makes it: the kernels' times over the fastest of them, its floor "
              "(SDPA twice), and how long it took.", "",
              "| call | rounds | measured: time / fastest | floor | s |", "|---|---|---|---|---|"]
    for row in rows:
        for m in row["measurements"]:
            timed = {n: ms for n, ms in m["ms"].items() if ms}
            best = min(timed.values())
            text = ", ".join(f"{n} {ms / best:.3f}" for n, ms in sorted(timed.items(), key=lambda x: x[1]))
            floor = _floor(m)
            lines.append(f"| {row['label']} | {m['reps']} | {text} | "
                         f"{'–' if floor is None else f'{floor:.3f}'} | {m['elapsed_s']:.2f} |")
    lines += ["", "Rules judged against the long rounds: per call, the worst and the mean of the picked kernel's "
              "speed over the fastest's (1.000: always the fastest).", "",
              "| rule | " + " | ".join(row["label"] for row in rows) + " | worst |",
              "|---|" + "---|" * (len(rows) + 1)]
    for rule, per_call in judged.items():
        cells = [f"{per_call[row['key']]['worst']:.3f} / {per_call[row['key']]['mean']:.3f}" for row in rows]
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {min(c['worst'] for c in per_call.values()):.3f} |")
    return "\n".join(lines) + "\n"


def write(out: str, rows: list[dict], facts: dict) -> None:
    os.makedirs(out, exist_ok=True)
    judged = judge(rows)
    with open(os.path.join(out, "contest_probe.json"), "w") as f:
        json.dump({**facts, "rows": rows, "judged": judged}, f, indent=1)
    with open(os.path.join(out, "contest_probe.md"), "w") as f:
        f.write(markdown(rows, judged))


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=os.path.join(ROOT, "attention", "cost_models", "sm90.json"))
    parser.add_argument("--from-json")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        write(args.out, saved["rows"], {k: v for k, v in saved.items() if k not in ("rows", "judged")})
        return 0
    if not torch.cuda.is_available():
        parser.error("no GPU here: this probe times kernels (use --from-json to rejudge a run)")
    device = torch.device("cuda")
    model = load(args.model, registry.names())
    limits = Limits.from_env()
    started = time.perf_counter()
    rows = []
    for call, contest in contested_calls(model):
        logging.info("probing %s: %s (model's choice %s)", call.key, ", ".join(contest.names), contest.keep)
        rows.append(probe_call(call, contest, model, device, limits))
    write(args.out, rows, {"environment": environment(), "model": args.model, "limits": dataclasses.asdict(limits),
                           "elapsed_s": round(time.perf_counter() - started, 1)})
    logging.info("%d contested calls in %.0f s; wrote %s", len(rows), time.perf_counter() - started, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
