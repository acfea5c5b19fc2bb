"""`auto_tuned`: measure the eligible kernels on this machine, keep the fastest accurate one.

Static `auto` rules (priority.py) were measured on one GPU. The tuner decides on the
user's own: the first time a call signature appears, it runs every eligible backend
on the real tensors, compares each output with an exact backend's output for the same
call, times the ones inside the error budget in interleaved rounds (measure.py), and
keeps the fastest. Decisions are saved per machine fingerprint (tuning_store.py), so
a later run reuses them without timing anything; the file is written once, after the
sampler run (`Tuner.flush`), never inside it.

Bounded: a signature gets at most `Limits.signature_s` of tuning and a sampler run at
most `Limits.run_s`; signatures met after the run's budget is spent use the static
`auto` order for that run and are tuned in a later one.

Error budgets (relative L1 and cosine similarity against the exact reference):
- default: rel. L1 <= 0.02 and cosine >= 0.9995. On the H200 the quantized kernels
  measured 0.003-0.018 on image and video shapes and 0.026 on SDXL's 77-key
  cross-attention with FP8 P·V (benchmarks/results/h200/kernels.md), which this
  budget refuses.
- calls that ask for precision (`attn_precision=float32` or
  `low_precision_attention=False`): rel. L1 <= 0.005 and cosine >= 0.99995. Quantized
  kernels are already ineligible for them; the budget also catches an exact kernel
  that is wrong on a shape.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import math
import os
import time
import zlib
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

import torch

from . import registry
from .call import FLAT, CallSignature
from .errors import describe_exception
from .measure import errors, interleaved_median_ms
from .tuning_store import TuningStore, default_path, store_for

log = logging.getLogger(__name__)

ENV_SIGNATURE_S = "ATTENTION_BACKENDS_TUNE_SIGNATURE_S"
ENV_RUN_S = "ATTENTION_BACKENDS_TUNE_RUN_S"
# Set to 0 and `auto` never times the kernels its cost model cannot separate: it runs the
# model's first choice (the same call then always gets the same kernel, on every machine).
ENV_AUTO_MEASURE = "ATTENTION_BACKENDS_AUTO_MEASURE"
# `auto`'s measurements live beside auto_tuned's decisions in a file of their own: one made
# among the few contested kernels must never pass for one made among all (auto_tuned's).
AUTO_MEASURED_FILE = "auto_measured.json"
# Query rows compared against the reference: enough to see a kernel's error, few
# enough that comparing costs little next to timing.
COMPARED_ROWS = 4096
# Candidates timed within this factor of the fastest single measurement are timed
# again in interleaved rounds; the rest cannot win and keep their single measurement.
CONTENDER_RATIO = 1.25
# Reference preference: PyTorch's own choice first (ComfyUI's default).
_REFERENCES = ("sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math")

_REPEAT = "(repeat)"
# The verdict of a candidate that measured faster than a kept choice, by less than the margin.
INSIDE_NOISE = "inside the noise floor"

MEASURED = "measured"
SAVED = "saved"

# (q, k, v, mask, scale) as the dispatcher received them.
Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[float]]
Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[float]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ErrorBudget:
    rel_l1: float
    min_cosine: float

    def problem(self, error: dict) -> Optional[str]:
        """Why a measured error is over budget, or None."""
        if error.get("nonfinite"):
            return f"{error['nonfinite']} non-finite values"
        if error["rel_l1"] > self.rel_l1:
            return f"over the error budget: rel. L1 {error['rel_l1']:.4f} > {self.rel_l1}"
        if error["cosine"] < self.min_cosine:
            return f"over the error budget: cosine {error['cosine']:.6f} < {self.min_cosine}"
        return None

    def to_json(self) -> dict:
        return {"rel_l1": self.rel_l1, "min_cosine": self.min_cosine}


DEFAULT_BUDGET = ErrorBudget(rel_l1=0.02, min_cosine=0.9995)
PRECISE_BUDGET = ErrorBudget(rel_l1=0.005, min_cosine=0.99995)


def budget_for(call: CallSignature) -> ErrorBudget:
    asks_precision = call.attn_precision == torch.float32 or not call.low_precision_ok
    return PRECISE_BUDGET if asks_precision else DEFAULT_BUDGET


def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        log.warning("attention backends: %s=%r is not a number of seconds; using %s", name, os.environ[name],
                    default)
        return default


@dataclasses.dataclass(frozen=True)
class Limits:
    """How much tuning may cost: per signature, per sampler run, timed rounds."""

    signature_s: float = 6.0
    run_s: float = 40.0
    reps: int = 7

    @classmethod
    def from_env(cls) -> "Limits":
        return cls(signature_s=_env_seconds(ENV_SIGNATURE_S, cls.signature_s),
                   run_s=_env_seconds(ENV_RUN_S, cls.run_s))


def signature_key(call: CallSignature) -> str:
    """A stable text key for a call signature (the device is the store's fingerprint)."""
    dtype = str(call.dtype).replace("torch.", "")
    precision = "-" if call.attn_precision is None else str(call.attn_precision).replace("torch.", "")
    mask = call.mask_kind + ("" if call.mask_shape is None else ":" + "x".join(map(str, call.mask_shape)))
    return "|".join((
        dtype, f"B{call.batch}", f"H{call.heads_q}", f"Hkv{call.heads_kv}", f"Nq{call.seq_q}", f"Nk{call.seq_k}",
        f"D{call.head_dim}", f"Dv{call.head_dim_v}", f"mask={mask}", f"in={call.layout_in}",
        f"out={call.layout_out}", f"prec={precision}", f"lowp={int(call.low_precision_ok)}",
        f"scale={int(call.custom_scale)}"))


def auto_measures() -> bool:
    """Whether `auto` times contested calls here (ATTENTION_BACKENDS_AUTO_MEASURE unset or not 0)."""
    return os.environ.get(ENV_AUTO_MEASURE, "1").strip().lower() not in ("0", "false", "no", "off")


def auto_measured_path(tuning_path: Optional[str] = None) -> str:
    """The file of `auto`'s measurements: AUTO_MEASURED_FILE beside the tuning file."""
    return os.path.join(os.path.dirname(os.path.abspath(tuning_path or default_path())), AUTO_MEASURED_FILE)


@dataclasses.dataclass
class Measurement:
    """One candidate on one call: its median time and error, or why it has none."""

    ms: Optional[float] = None
    error: Optional[dict] = None
    failure: Optional[str] = None
    repeat_ms: Optional[float] = None  # one candidate only: timed a second time in the same rounds


@dataclasses.dataclass
class Decision:
    """What the tuner chose for a signature, and the measurements that decided it."""

    key: str
    backend: str
    source: str  # MEASURED this run or SAVED by an earlier one
    reference: str
    tuning_ms: float
    budget: dict
    candidates: dict[str, dict]
    complete: bool = True  # every eligible candidate was measured
    tuned_at: str = ""
    # |1 - ratio| of one candidate timed twice in the same rounds (the kept choice when
    # there is one, else the reference): time ratios between candidates closer to 1 than
    # this are noise. None when no rounds were run.
    noise_floor: Optional[float] = None

    def to_json(self) -> dict:
        return {"backend": self.backend, "reference": self.reference, "tuning_ms": self.tuning_ms,
                "budget": self.budget, "candidates": self.candidates, "tuned_at": self.tuned_at,
                "noise_floor": self.noise_floor}

    @classmethod
    def from_saved(cls, key: str, saved: dict) -> "Decision":
        return cls(key=key, backend=saved["backend"], source=SAVED, reference=saved["reference"],
                   tuning_ms=saved.get("tuning_ms") or 0.0, budget=saved.get("budget") or {},
                   candidates=saved["candidates"], tuned_at=saved.get("tuned_at", ""),
                   noise_floor=saved.get("noise_floor"))


def decide(measured: dict[str, Measurement], budget: ErrorBudget, keep: Optional[str] = None,
           margin: float = 0.0) -> tuple[Optional[str], dict[str, dict]]:
    """The fastest candidate whose error is inside `budget`, and a verdict for each.

    keep: a choice made before measuring (`auto`'s cost model on a contested call). It
    stays chosen unless an accurate candidate measured faster by more than `margin` (the
    measurement's noise floor): a difference the measurement cannot resolve must not
    overturn it.

    Pure: the CPU tests drive it with made-up times and errors.
    """
    fit: dict[str, float] = {}
    verdicts: dict[str, str] = {}
    for name, m in measured.items():
        if m.failure is not None:
            verdicts[name] = m.failure
            continue
        problem = budget.problem(m.error) if m.error is not None else "no error measured"
        if problem is not None:
            verdicts[name] = problem
        elif m.ms is None:
            verdicts[name] = "not timed"
        else:
            fit[name] = m.ms
    chosen = min(fit, key=fit.get) if fit else None
    if keep in fit and fit[keep] <= fit[chosen] * (1.0 + margin):
        chosen = keep
    for name, ms in fit.items():
        ratio = ms / fit[chosen]
        if name == chosen:
            verdicts[name] = "chosen"
        elif ratio < 1.0:
            verdicts[name] = (f"{INSIDE_NOISE}: {ratio:.3f}x the chosen time, within the measurement's "
                              f"{margin:.1%}; the cost model's choice kept")
        else:
            verdicts[name] = f"slower: {ratio:.3f}x the chosen time"
    table = {}
    for name, m in measured.items():
        error = m.error or {}
        table[name] = {"ms": _finite(m.ms), "rel_l1": _finite(error.get("rel_l1")),
                       "cosine": _finite(error.get("cosine")), "max_abs": _finite(error.get("max_abs")),
                       "nonfinite": error.get("nonfinite"), "verdict": verdicts[name]}
    return chosen, table


def _finite(value: Optional[float]) -> Optional[float]:
    """JSON (and the saved file's checks) hold finite numbers: a NaN error is kept as null,
    its verdict already says why."""
    return value if value is None or math.isfinite(value) else None


def _noise_floor(measured: dict[str, Measurement]) -> Optional[float]:
    """|1 - ratio| of the candidate timed twice, or None when none was."""
    twice = next((m for m in measured.values() if m.ms is not None and m.repeat_ms is not None), None)
    return None if twice is None else _finite(abs(1.0 - twice.repeat_ms / twice.ms))


def _rows(out: torch.Tensor, layout: str) -> torch.Tensor:
    """The first COMPARED_ROWS query rows of an output in the call's output form."""
    return out[:, :COMPARED_ROWS] if layout == FLAT else out[:, :, :COMPARED_ROWS]


def measure_on_device(call: CallSignature, tensors: Tensors, runs: dict[str, Run], reference: str,
                      limits: Limits, seconds_left: float,
                      clock: Callable[[], float] = time.perf_counter, seed: Optional[int] = None,
                      repeat: Optional[str] = None) -> dict[str, Measurement]:
    """Run each candidate once (compiles, checks its error against `reference`) and time
    one measurement of each accurate one; then time the contenders (within
    CONTENDER_RATIO of the best) in interleaved rounds, as many as `seconds_left` allows.

    Times are steady-state costs per call in a stream (measure.interleaved_median_ms):
    a kernel whose host path outlasts its GPU work is charged for the host path, as a
    model is.

    seed: the rounds' shuffle; by default from the signature, so that calls with the same
    candidates do not all see one sequence of orders (a kernel's place in a round would
    then be the same on every call).
    repeat: the candidate timed twice in the rounds for the noise floor, when it is a
    contender (else, and by default, the reference). On `auto`'s contested calls SDPA is
    often no contender (outside CONTENDER_RATIO of the leaders), so the kept choice is
    timed twice instead (benchmarks/results/h200/cost_model/contest_probe: 53 of 60
    measurements with SDPA as the repeat had no floor).
    """
    q, k, v, mask, scale = tensors
    deadline = clock() + seconds_left
    device = q.device
    expected = _rows(runs[reference](q, k, v, mask, scale), call.layout_out)
    budget = budget_for(call)
    results: dict[str, Measurement] = {}
    for name, run in runs.items():
        if clock() > deadline:
            results[name] = Measurement(failure="not measured: the signature's tuning time was spent")
            continue
        try:
            out = run(q, k, v, mask, scale)
        except Exception as error:  # a kernel that breaks on this call is a verdict, not a crash
            results[name] = Measurement(failure="raised " + describe_exception(error))
            continue
        error = errors(_rows(out, call.layout_out), expected)
        error["nonfinite"] = int((~torch.isfinite(out)).sum().item())
        del out
        results[name] = Measurement(error=error)
        if budget.problem(error) is None:
            fn = functools.partial(run, q, k, v, mask, scale)
            results[name].ms = interleaved_median_ms({name: fn}, device, warmup=0, reps=1, min_reps=1)[name]
    timed = {name: m.ms for name, m in results.items() if m.ms is not None}
    if len(timed) > 1:
        best = min(timed.values())
        contenders = {name: functools.partial(runs[name], q, k, v, mask, scale)
                      for name, ms in timed.items() if ms <= CONTENDER_RATIO * best}
        left = deadline - clock()
        if len(contenders) > 1 and left > 0:
            twice = repeat if repeat in contenders else reference
            if twice in contenders:  # the noise floor: one candidate twice in the same rounds
                contenders[_REPEAT] = contenders[twice]
            if seed is None:
                seed = zlib.crc32(signature_key(call).encode())
            medians = interleaved_median_ms(contenders, device, warmup=0, reps=limits.reps, min_reps=1,
                                            budget_s=left, seed=seed)
            if twice in contenders:
                results[twice].repeat_ms = medians.pop(_REPEAT, None)
            for name, ms in medians.items():
                results[name].ms = ms
    return results


class Measure(Protocol):
    """What the tuner measures with: measure_on_device, or a stand-in in the CPU tests."""

    def __call__(self, call: CallSignature, tensors: Tensors, runs: dict[str, Run], reference: str,
                 limits: Limits, seconds_left: float, *, repeat: Optional[str] = None) -> dict[str, Measurement]: ...


class Tuner:
    """Chooses a backend per call signature by measuring, and remembers the choice.

    One per node (or per Dispatcher outside ComfyUI); the store behind it is shared
    per file and machine. `retune=True` forgets what this machine has saved (once, at
    the first decision) and measures every signature of the run again.
    """

    def __init__(self, path: Optional[str] = None, *, limits: Optional[Limits] = None, retune: bool = False,
                 measure: Measure = measure_on_device, clock: Callable[[], float] = time.perf_counter,
                 store: Optional[Callable[[torch.device], TuningStore]] = None) -> None:
        self.path = path or default_path()
        self.limits = limits or Limits.from_env()
        self.retune = retune
        self._measure = measure
        self._clock = clock
        self._store_for = store or functools.partial(store_for, self.path)
        self._stores: dict[int, TuningStore] = {}  # the stores this tuner has used, to flush
        self._cleared = not retune
        self.begin_run()

    def begin_run(self) -> None:
        """Reset the per-run budget and the run's record of decisions."""
        self.run_spent_s = 0.0
        self.decisions: list[Decision] = []
        self.over_budget: list[str] = []  # signatures left to static auto this run

    def store(self, device: torch.device) -> TuningStore:
        store = self._store_for(device)
        self._stores.setdefault(id(store), store)
        return store

    def flush(self) -> None:
        """Write the decisions of this run to the file (at the end of a sampler run: the
        file is read and rewritten once, outside sampling). A file that cannot be written
        is logged; its decisions still serve this process."""
        for store in list(self._stores.values()):
            try:
                store.flush()
            except OSError as error:  # a read-only user directory must not end the run
                log.warning("attention backends: cannot save tuning decisions to %s (%s); they serve this "
                            "process only", store.path, error)

    def summary(self, in_use: Iterable[Decision] = ()) -> dict[str, Any]:
        """This run's tuning, for the run report.

        in_use: the decisions of the plans that served this run. A plan kept from an
        earlier run of the same node (ComfyUI reused the node's output) carries a
        decision this run neither measured nor loaded: it is listed too, as `kept`.
        """
        this_run = {d.key for d in self.decisions}
        kept = list({d.key: d for d in in_use if d.key not in this_run}.values())
        return {
            "file": self.path,
            "tuning_s": round(self.run_spent_s, 3),
            "run_budget_s": self.limits.run_s,
            "signature_budget_s": self.limits.signature_s,
            "measured": sum(d.source == MEASURED for d in self.decisions),
            "reused": sum(d.source == SAVED for d in self.decisions),
            "kept": len(kept),
            "left_to_auto": list(self.over_budget),
            "decisions": [{"signature": d.key, **d.to_json(), "source": d.source, "complete": d.complete,
                           "this_run": d.key in this_run} for d in self.decisions + kept],
        }

    def saved(self, call: CallSignature, device: torch.device) -> Optional[Decision]:
        """This machine's saved decision for `call`, without tensors and without recording
        it as this run's (None when there is none, or when a re-tune will forget it)."""
        if not self._cleared:
            return None
        saved = self.store(device).get(signature_key(call))
        return None if saved is None else Decision.from_saved(signature_key(call), saved)

    def reused(self, decision: Decision) -> None:
        """Count a saved decision that serves this run without `choose` (a compiled graph
        that runs its call as traced SDPA)."""
        self.decisions.append(decision)

    def choose(self, call: CallSignature, tensors: Tensors, runs: dict[str, Run],
               prefer: Sequence[str] = (), keep: Optional[str] = None) -> Optional[Decision]:
        """The decision for `call` among `runs` (eligible backends, prepared), or None
        when it cannot be made now (no exact reference, or the run's budget is spent).

        prefer: backends to measure first, after the reference (the static auto choice):
        when the signature's time runs out before every candidate is measured (video
        shapes take ~0.3 s a call), the likely winner has been.
        keep: the choice made without measuring, kept unless another accurate backend
        measures faster by more than this measurement's noise floor (`decide`).
        """
        key = signature_key(call)
        store = self.store(tensors[0].device)
        if not self._cleared:
            forgotten = store.clear()
            self._cleared = True
            log.info("attention backends: re-tuning: forgot %d saved decisions for this machine in %s",
                     forgotten, store.path)
        saved = store.get(key)
        if saved is not None and saved["backend"] in runs:
            decision = Decision.from_saved(key, saved)
            self.decisions.append(decision)
            return decision
        reference = next((name for name in _REFERENCES if name in runs), None)
        if reference is None:
            reference = next((name for name in runs if registry.get(name).exact), None)
        if reference is None:
            return None
        left = min(self.limits.signature_s, self.limits.run_s - self.run_spent_s)
        if left <= 0:
            self.over_budget.append(key)
            return None
        order = [reference] + [n for n in prefer if n in runs] + list(runs)
        ordered = {name: runs[name] for name in dict.fromkeys(order)}
        started = self._clock()
        measured = self._measure(call, tensors, ordered, reference, self.limits, left, repeat=keep)
        spent = self._clock() - started
        self.run_spent_s += spent
        budget = budget_for(call)
        noise_floor = _noise_floor(measured)
        chosen, table = decide(measured, budget, keep=keep, margin=noise_floor or 0.0)
        if chosen is None:
            log.warning("attention backends: no backend passed tuning on %s (%s); using the static order",
                        call.describe(), "; ".join(f"{n}: {row['verdict']}" for n, row in table.items()))
            return None
        complete = all(m.failure is None or not m.failure.startswith("not measured") for m in measured.values())
        decision = Decision(key=key, backend=chosen, source=MEASURED, reference=reference,
                            tuning_ms=round(spent * 1e3, 3), budget=budget.to_json(), candidates=table,
                            complete=complete, noise_floor=noise_floor,
                            tuned_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        self.decisions.append(decision)
        if complete:
            store.put(key, decision.to_json())  # written by flush(), after the run
        log.info("attention backends: tuned %s -> %s in %.0f ms%s", call.describe(), chosen, spent * 1e3,
                 "" if complete else " (partial: raise " + ENV_SIGNATURE_S + " to measure every candidate)")
        return decision
