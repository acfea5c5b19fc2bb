"""Measure kernels on calls, and `python -m attention calibrate`: fit this GPU's cost model.

`time_call` times every eligible kernel on one call in interleaved rounds with the
steady-state method of measure.py (each measurement ~10 ms of back-to-back calls, so a
kernel whose host path outlasts its GPU work is charged for the host path, as a model
is), plus SDPA a second time in the same rounds: the noise floor, the ratio two timings
of one kernel show in that run. The grid benchmark, the held-out benchmark and
`calibrate` all measure through it.

Budget: rounds stop at `reps`, or earlier when one call's `budget_s` would be exceeded,
but never below MIN_REPS; the grid as a whole stops starting calls once its budget is
spent, and says which calls it left out. `calibrate` adds a limit on the whole run,
measuring and fitting (CALIBRATE_LIMIT_S).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
import zlib
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from . import registry
from .bench.inputs import call_form, make_qkv
from .calibration_calls import Call
from .call import describe_call
from .cost_fit import Sample, fit_model
from .cost_model import CostModel, work_of
from .cost_rescale import rescale_model, with_kernels
from .errors import describe_exception
from .progress import progress
from .measure import interleaved_median_ms, time_ms
from .priority import device_class

log = logging.getLogger(__name__)

BASELINE = "sdpa"


def repeat_label(name: str) -> str:
    """The row of kernel `name` timed a second time in the same rounds."""
    return f"{name} (repeat)"


# The noise floor's row: SDPA again, through its own dispatcher, in the same rounds.
REPEAT = repeat_label(BASELINE)
MIN_REPS = 3
WARMUP = 2
# Long calls (the fastest single call at least this long) are screened: each row is timed
# once, and rows slower than SCREEN_RATIO x the fastest keep that one timing (they cannot
# win, and a round of the longest grid call over a dozen kernels takes seconds). At these
# lengths a host path (FA4's: 72 µs) is 1.4% of one call at most, far inside the screen.
# (From 20 ms before: run10's Wan 2.1 1.3B 81f CFG, 17.5 ms, went unscreened and fit 11
# rounds of its 19 rows into the call's 6 s where the other calls had 16-20.)
LONG_CALL_MS = 5.0
SCREEN_RATIO = 1.5


@dataclasses.dataclass
class CallTiming:
    """One call's medians in µs per kernel (and extra rows), with what was left out."""

    call: Call
    times_us: dict[str, float]
    chose: dict[str, str] = dataclasses.field(default_factory=dict)  # extra rows: the kernel their plan ran
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # kernel: why not timed
    single: list[str] = dataclasses.field(default_factory=list)  # rows screened out: one timing only

    @property
    def noise_floor(self) -> Optional[float]:
        """The widest |1 - ratio| of two timings of one kernel in the same rounds: a kernel
        and its repeat row (SDPA's; each chosen kernel's with `repeat_chosen`), and two
        extra rows whose dispatchers ran the same kernel (on a masked call the kernel rows
        keep the mask, and two `auto` rows that served it trimmed are the only two timings
        of that way of running it). None without any such pair."""
        pairs = [(name, label) for name in self.times_us if (label := repeat_label(name)) in self.times_us]
        rows = sorted(self.chose)
        pairs += [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]
                  if self.chose[a] == self.chose[b] and a in self.times_us and b in self.times_us]
        gaps = [abs(1.0 - self.times_us[b] / self.times_us[a]) for a, b in pairs if self.times_us[a] > 0]
        return max(gaps) if gaps else None

    def to_json(self) -> dict[str, Any]:
        return {"call": dataclasses.asdict(self.call), "times_us": self.times_us, "chose": self.chose,
                "skipped": self.skipped, "single": self.single, "noise_floor": self.noise_floor}


def kernel_names(device: torch.device) -> list[str]:
    """Tunable kernels available here, SDPA first."""
    names = [b.name for b, a in registry.availability_table() if b.tunable and a.available]
    return [BASELINE] + [n for n in names if n != BASELINE]


def time_call(call: Call, device: torch.device, names: Sequence[str], *, reps: int = 5, budget_s: float = 3.0,
              extra: Optional[Mapping[str, Callable[[], Any]]] = None, repeat_chosen: bool = False,
              long_reps: int = 0, long_budget_s: float = 0.0) -> CallTiming:
    """Time every kernel of `names` that can serve `call` here, SDPA twice, and `extra`
    dispatchers (made by a factory each, e.g. `auto`), all in the same interleaved rounds.

    repeat_chosen: also time twice each kernel an `extra` dispatcher chose, so the noise
    floor is measured on the kernels being judged (on the H200's long calls one kernel's
    two rows read up to 5% apart where SDPA's read 0.2-2.2%: heldout/run3/heldout.md). The
    order of the rounds is shuffled from a seed of the call's key, so no row sits in the
    same places on every call.

    long_reps, long_budget_s: the rounds and seconds a long call gets (see `rounds`)."""
    from .dispatch import Dispatcher  # the dispatcher imports the tuner, which imports measure

    q, k, v = make_qkv(call.model_shape(), device, call.torch_dtype)
    mask = call.make_mask(device)
    form = call_form(call.model_shape())
    precision = torch.float32 if call.fp32_softmax else None
    signature = describe_call(q, k, v, call.heads, mask, attn_precision=precision, **form)
    eligible = Dispatcher(BASELINE).eligible(signature, (q, k, v, mask, None))
    timing = CallTiming(call, {})
    rows: dict[str, Any] = {}
    for name in names:
        if name not in eligible:
            timing.skipped[name] = "cannot serve this call here"
            continue
        rows[name] = Dispatcher(name, strict=True)
    if BASELINE in rows:
        rows[REPEAT] = Dispatcher(BASELINE, strict=True)
    for label, factory in (extra or {}).items():
        rows[label] = factory()
    fns: dict[str, Callable[[], Any]] = {}
    for label, dispatcher in rows.items():
        fn = functools.partial(dispatcher, q, k, v, call.heads, mask, attn_precision=precision, **form)
        try:
            fn()  # plans, compiles, checks
        except Exception as error:  # a kernel that breaks on a call is a result, not a crash
            timing.skipped[label] = "raised " + describe_exception(error)
            continue
        fns[label] = fn
        if label in (extra or {}):
            timing.chose[label] = dispatcher.plans()[-1].name
    if repeat_chosen:
        for name in sorted(set(timing.chose.values()) - {BASELINE}):
            if name in fns:
                again = functools.partial(Dispatcher(name, strict=True), q, k, v, call.heads, mask,
                                          attn_precision=precision, **form)
                again()
                fns[repeat_label(name)] = again
    warmup = WARMUP
    if fns and device.type == "cuda":
        once = {label: time_ms(fn, device) for label, fn in fns.items()}
        best = min(once.values())
        if best >= LONG_CALL_MS:
            keep = {BASELINE, *(extra or {}), *(label for label in fns if label.endswith(repeat_label("")))}
            timing.single = [label for label, ms in once.items() if ms > SCREEN_RATIO * best and label not in keep]
            timing.times_us = {label: once[label] * 1e3 for label in timing.single}
            fns = {label: fn for label, fn in fns.items() if label not in timing.single}
            warmup = 0  # planned and timed once already
            reps, budget_s = rounds(best, reps, budget_s, long_reps, long_budget_s)
    if fns:
        medians = interleaved_median_ms(fns, device, warmup=warmup, reps=max(reps, MIN_REPS), budget_s=budget_s,
                                        min_reps=MIN_REPS, seed=zlib.crc32(call.key.encode()))
        timing.times_us.update({label: ms * 1e3 for label, ms in medians.items()})
    del q, k, v, mask
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return timing


def rounds(best_ms: float, reps: int, budget_s: float, long_reps: int = 0,
           long_budget_s: float = 0.0) -> tuple[int, float]:
    """Interleaved rounds and seconds for a call whose fastest row took `best_ms` once: a
    long call (LONG_CALL_MS) gets at least `long_reps` rounds and `long_budget_s`. On the
    H200's long calls, the three or more rows of one kernel read a median 2% and up to 6%
    apart after 20 rounds (heldout/run10 to run12), as wide as the differences `auto` is
    judged on there; the held-out run gives them more rounds (benchmarks/heldout.py),
    `calibrate` does not."""
    if best_ms < LONG_CALL_MS:
        return reps, budget_s
    return max(reps, long_reps), max(budget_s, long_budget_s)


TimeCall = Callable[..., CallTiming]


def measure_grid(calls: Sequence[Call], device: torch.device, names: Sequence[str], *, budget_s: float,
                 reps: int = 5, call_budget_s: float = 3.0, time_one: TimeCall = time_call,
                 clock: Callable[[], float] = time.perf_counter,
                 label: str = "cost grid") -> tuple[list[CallTiming], list[str]]:
    """Time every call of `calls` (in order) until `budget_s` is spent; returns the
    timings and the keys of the calls left out for lack of time."""
    started = clock()
    timings: list[CallTiming] = []
    left_out: list[str] = []
    for call in progress(list(calls), label):
        left = budget_s - (clock() - started)
        if left <= 0:
            left_out.append(call.key)
            continue
        timings.append(time_one(call, device, names, reps=reps, budget_s=min(call_budget_s, left)))
    if left_out:
        log.warning("attention backends: the %.0f s budget ran out; %d calls not measured: %s", budget_s,
                    len(left_out), ", ".join(left_out))
    return timings, left_out


def modelled(name: str) -> bool:
    """Whether the cost model fits kernel `name`: SDPA and every kernel outside its family.

    SDPA's sub-backends are the kernels SDPA itself chooses among: one beats SDPA only
    where PyTorch's choice is wrong, which the H200 grid (cost_model/cost_grid.json) never
    showed outside the noise floor, so a model of them could only move calls by its own
    error.
    """
    return name == BASELINE or registry.get(name).family != registry.get(BASELINE).family


def samples(timings: Iterable[CallTiming], capability: Optional[tuple[int, int]] = (9, 0),
            device_type: str = "cuda") -> dict[str, list[Sample]]:
    """Per kernel, its measured calls as the fit takes them (extra rows, the repeat and
    kernels the model leaves out left out)."""
    known = {n for n in registry.names() if modelled(n)}
    by_kernel: dict[str, list[Sample]] = {}
    for timing in timings:
        signature = timing.call.signature(device_type, capability)
        for name, us in timing.times_us.items():
            if name not in known or not us > 0:
                continue
            work = work_of(signature, copies=registry.get(name).contiguous)
            by_kernel.setdefault(name, []).append(Sample(timing.call.key, work, us))
    return by_kernel


def timing_from_json(row: Mapping[str, Any]) -> CallTiming:
    call_data = dict(row["call"])
    if call_data.get("mask_shape") is not None:
        call_data["mask_shape"] = tuple(call_data["mask_shape"])
    return CallTiming(Call(**call_data), dict(row["times_us"]), dict(row.get("chose", {})),
                      dict(row.get("skipped", {})), list(row.get("single", [])))


def device_facts(device: torch.device) -> tuple[str, str, int, Optional[tuple[int, int]]]:
    """(GPU class, GPU name, SM count, capability) of a device."""
    if device.type != "cuda":
        return "default", "CPU", 1, None
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    capability = tuple(torch.cuda.get_device_capability(index))
    return device_class("cuda", capability), props.name, props.multi_processor_count, capability


def fit_timings(timings: Sequence[CallTiming], *, gpu_class: str, gpu: str, sms: int,
                capability: Optional[tuple[int, int]], device_type: str = "cuda", source: str = "default",
                steps: Optional[int] = None, time_limit_s: Optional[float] = None) -> tuple[CostModel, dict]:
    """The cost model of a measured grid."""
    kwargs = {} if steps is None else {"steps": steps}
    return fit_model(samples(timings, capability, device_type), gpu_class=gpu_class, gpu=gpu, sms=sms, source=source,
                     time_limit_s=time_limit_s, **kwargs)


def fit_calibration(timings: Sequence[CallTiming], *, gpu_class: str, gpu: str, sms: int,
                    capability: Optional[tuple[int, int]], device_type: str, prior: Optional[CostModel],
                    steps: Optional[int] = None, time_limit_s: Optional[float] = None) -> CostModel:
    """This machine's model from its reduced grid: the shipped model of its GPU class
    rescaled where one exists (cost_rescale.py), kernels it lacks or does not fit fitted
    afresh beside it; without a shipped model (or when SDPA does not fit it), every kernel
    fitted afresh."""
    from . import cost_store

    by_kernel = samples(timings, capability, device_type)
    model, afresh = None, list(by_kernel)
    if prior is not None:
        model, rescales, afresh = rescale_model(prior, by_kernel, gpu=gpu, sms=sms, source=cost_store.CALIBRATED)
        for name, r in rescales.items():
            error = "-" if r.median_log_error is None else f"{100 * r.median_log_error:.1f}%"
            log.info("attention backends: %s against the shipped %s model: host x%.3f (%d calls), GPU x%.3f "
                     "(%d calls), median error after %s%s", name, prior.gpu, r.host, r.host_points, r.gpu,
                     r.gpu_points, error, "; fitting it afresh" if name in afresh else "")
    afresh = [name for name in afresh if len(by_kernel[name]) >= _MIN_FIT_POINTS]
    if model is not None and not afresh:
        return model
    log.info("attention backends: fitting %s to %d calls%s", ", ".join(afresh), len(timings),
             "" if time_limit_s is None else f" (at most {time_limit_s:.0f} s)")
    # The fit is many small tensor ops: one thread runs them fastest.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fitted, fits = fit_model({name: by_kernel[name] for name in afresh}, gpu_class=gpu_class, gpu=gpu, sms=sms,
                                 source=cost_store.CALIBRATED, min_points=_MIN_FIT_POINTS, time_limit_s=time_limit_s,
                                 **({} if steps is None else {"steps": steps}))
    finally:
        torch.set_num_threads(threads)
    for name, fit in fits.items():
        s = fit.summary()
        log.info("attention backends: %s fitted on %d calls, median error %.1f%%, worst %.1f%%", name, s["points"],
                 100 * s["median_abs_error"], 100 * s["max_abs_error"])
    return fitted if model is None else with_kernels(model, fitted)


# A kernel fitted afresh needs this many measured calls (cost_fit.fit_model's default).
_MIN_FIT_POINTS = 8


# `calibrate` ends within CALIBRATE_LIMIT_S: it stops starting calls after
# CALIBRATE_BUDGET_S of measuring, and the fit then gets what is left but FIT_RESERVE_S
# (saving the file), never less than MIN_FIT_S. A call started before the measuring budget
# ran out ends within its own round budget (CALL_BUDGET_S) plus its first-call compile;
# the fit then stops where its time runs out, keeping the best parameters found so far.
CALIBRATE_LIMIT_S = 300.0
CALIBRATE_BUDGET_S = 240.0
CALL_BUDGET_S = 3.0
FIT_RESERVE_S = 5.0
MIN_FIT_S = 15.0


def calibrate(device: torch.device, *, budget_s: float = CALIBRATE_BUDGET_S, path: Optional[str] = None,
              time_one: TimeCall = time_call, clock: Callable[[], float] = time.perf_counter,
              steps: Optional[int] = None, limit_s: float = CALIBRATE_LIMIT_S,
              grid_path: Optional[str] = None) -> tuple[CostModel, str, list[str]]:
    """Measure the reduced grid on `device`, fit this GPU's cost model and save it under
    the machine's fingerprint; returns the model, the file and the calls left out.
    grid_path: also write the measured calls there (cost_grid.json's form), to refit or
    judge offline."""
    from . import cost_store
    from .calibration_calls import grid

    started = clock()
    gpu_class, gpu, sms, capability = device_facts(device)
    names = [n for n in kernel_names(device) if modelled(n)]
    timings, left_out = measure_grid(grid(reduced=True), device, names,
                                     budget_s=min(budget_s, limit_s - FIT_RESERVE_S - MIN_FIT_S),
                                     call_budget_s=CALL_BUDGET_S, time_one=time_one, clock=clock, label="calibrating")
    if grid_path is not None:
        with open(grid_path, "w", encoding="utf-8") as handle:
            json.dump({"gpu_class": gpu_class, "gpu": gpu, "sms": sms, "capability": capability,
                       "left_out": left_out, "rows": [t.to_json() for t in timings]}, handle, indent=1)
    fit_s = max(MIN_FIT_S, limit_s - (clock() - started) - FIT_RESERVE_S)
    model = fit_calibration(timings, gpu_class=gpu_class, gpu=gpu, sms=sms, capability=capability,
                            device_type=device.type, prior=cost_store.shipped_model(gpu_class), steps=steps,
                            time_limit_s=fit_s)
    saved = cost_store.save_calibration(model, device, path)
    return model, saved, left_out


def calibrate_main(budget_s: float = CALIBRATE_BUDGET_S, path: Optional[str] = None,
                   grid_path: Optional[str] = None) -> int:
    """`python -m attention calibrate`."""
    if not torch.cuda.is_available():
        log.error("attention backends: calibrate measures kernels on a CUDA GPU, and none is visible here; "
                  "on the CPU auto always runs sdpa")
        return 2
    model, saved, left_out = calibrate(torch.device("cuda"), budget_s=budget_s, path=path, grid_path=grid_path)
    log.info("attention backends: calibrated %s (%s): %d kernels; saved to %s%s. auto uses it from now on.",
             model.gpu, model.gpu_class, len(model.kernels), saved,
             f"; {len(left_out)} calls left out for time" if left_out else "")
    return 0
