"""Command line: `python -m attention doctor`, `bench [--quick]` and `calibrate`."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attention",
                                     description="ComfyUI Attention Backends: the backend library")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="every backend on this machine, and what auto picks")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    bench = commands.add_parser("bench", help="time every available backend on model-shaped calls")
    bench.add_argument("--quick", action="store_true", help="a few shapes, few repetitions")
    bench.add_argument("--shapes", help="comma-separated shape keys (see attention/shapes.py)")
    bench.add_argument("--backends", help="comma-separated backend names (default: all available)")
    bench.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    bench.add_argument("--reps", type=int, default=20, help="interleaved rounds per shape (at most)")
    bench.add_argument("--budget", type=float, default=10.0,
                       help="seconds of timing per shape; fewer rounds run on shapes that need more")
    bench.add_argument("--out", help="directory for kernels.json, kernels.md and chart.png")
    calibrate = commands.add_parser("calibrate", help="fit this GPU's cost model for auto (at most 5 minutes)")
    calibrate.add_argument("--budget", type=float, default=240.0, help="seconds of measuring (the fit follows)")
    calibrate.add_argument("--file", help="calibration file (default: beside the tuning file)")
    calibrate.add_argument("--grid", help="also write the measured calls to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "doctor":
        from .doctor import main as doctor_main
        return doctor_main(as_json=args.json)
    if args.command == "calibrate":
        from .calibrate import calibrate_main
        return calibrate_main(budget_s=args.budget, path=args.file, grid_path=args.grid)
    from .bench import main as bench_main
    split = lambda text: [p.strip() for p in text.split(",") if p.strip()] if text else None  # noqa: E731
    return bench_main(quick=args.quick, shapes=split(args.shapes), backends=split(args.backends),
                      out_dir=args.out, dtype_name=args.dtype, reps=args.reps, budget_s=args.budget)


if __name__ == "__main__":
    sys.exit(main())
