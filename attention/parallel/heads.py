"""Head-parallel attention inside one process: one call's heads split across GPUs.

`head_parallel` in a priority list sends calls here (attention/backends/parallel.py). For
each call signature and home device (the device the call's tensors live on) the group's
policy decides once whether to split and how (cost.py: a transfer + kernel cost model;
calls too small to gain stay on the home device). A split call:
- records `ready` on the caller's stream; each other device's share goes through its lane
  (lanes.py: copy stream, compute stream, events; peer copies, or pinned host staging
  where the GPUs have no peer access) and is served there by that device's own
  Dispatcher, with the priority names that follow `head_parallel` (default `auto`);
- serves the home device's share on the caller's stream with the home Dispatcher;
- writes every share's output into one output tensor laid out for the caller's form,
  and makes the caller's stream wait for the lanes' `done` events. No host sync.

One split is in flight at a time per group: ComfyUI 0.28's multi-GPU clones call from
one thread per device, and a call that finds the group busy runs on its own device.
A device whose share raises (out of memory, no kernel for the share, a failing copy)
drops out of the group with the reason, logged once; the call is decided again without
it. `readmit()` brings dropped devices back.

Devices: ATTENTION_BACKENDS_DEVICES ("0,1", "cuda:0,cuda:2"; "cpu,cpu" runs the split
logic on the CPU, for tests), default every visible GPU; or `configure()` in code.
ATTENTION_BACKENDS_HEAD_SPLIT=even splits every call evenly, whatever the cost model says
(for measurements).

Counters: one integer per decision on the hot path; the first TIMED_CALLS split calls of
each decision in a run are timed with CUDA events (read when the run's summary is made).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import weakref
from typing import Iterable, Optional

import torch

from ..backends.parallel import NAME as HEAD_PARALLEL
from ..call import FLAT, CallSignature, describe_call
from ..counters import count_value
from ..dispatch import Dispatcher
from ..errors import NoBackendError, describe_exception
from ..priority_list import NOTHING_AFTER, Priority, parse_priority
from ..registry import AUTO
from .cost import CostModel, Choice, EvenSplit, Link, Share, SplitPolicy, Traffic
from .lanes import Attend, Inputs, Lane, LaneTiming, caller_stream
from .topology import assumed_link, has_peer_access, measured_link

log = logging.getLogger(__name__)

ENV_DEVICES = "ATTENTION_BACKENDS_DEVICES"
ENV_SPLIT = "ATTENTION_BACKENDS_HEAD_SPLIT"
SPLIT_POLICIES = {"cost": CostModel, "even": EvenSplit}
STAGING = ("auto", "always")
# Split calls per decision and run whose lanes are timed with CUDA events.
TIMED_CALLS = 4

# Which dispatcher of a device serves a piece of work: a share of a split call, or a
# whole call kept on its device (kept apart so a thread's local calls never share
# plans and counters with another thread's split).
_SHARE = "share"
_LOCAL = "local"


def parse_devices(spec: str | Iterable[str | int | torch.device]) -> tuple[torch.device, ...]:
    """"0,1" / "cuda:0, cuda:2" / "cpu,cpu" / a list of devices or indices."""
    items = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    devices = []
    for item in items:
        if item == "":
            continue
        if isinstance(item, int) or (isinstance(item, str) and item.isdigit()):
            devices.append(torch.device("cuda", int(item)))
            continue
        try:
            device = torch.device(item)
        except (RuntimeError, TypeError):
            raise ValueError(f"{item!r} is not a device: write cuda:N, N or cpu") from None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        devices.append(device)
    return tuple(devices)


def visible_devices() -> tuple[torch.device, ...]:
    if not torch.cuda.is_available():
        return ()
    return tuple(torch.device("cuda", i) for i in range(torch.cuda.device_count()))


@dataclasses.dataclass(eq=False)
class _Decision:
    """How one signature's calls arriving on `home` are served, and what they did."""

    home: torch.device
    choice: Choice
    generation: int
    local: Attend
    home_share: Optional[Share] = None
    home_attend: Optional[Attend] = None
    lanes: tuple[tuple[Share, Lane, Attend], ...] = ()
    ready: Optional[torch.cuda.Event] = None
    # Calls served; advanced with next() (one C call: exact when clone threads share it).
    counter: "itertools.count[int]" = dataclasses.field(default_factory=itertools.count)
    timings: list = dataclasses.field(default_factory=list)  # (call start, call end, [LaneTiming])

    @property
    def split(self) -> bool:
        return self.choice.split

    @property
    def calls(self) -> int:
        return count_value(self.counter)


class _LaneFailed(Exception):
    def __init__(self, device: torch.device, error: Exception) -> None:
        super().__init__(str(error))
        self.device = device
        if isinstance(error, NoBackendError):
            self.reason = "no backend could serve its share (" + "; ".join(
                f"{r.backend}: {', '.join(r.reasons)}" for r in error.rejected) + ")"
        else:
            self.reason = describe_exception(error)


class HeadSplitKernel:
    """head_parallel's kernel for one call signature (a Backend kernel: (q, k, v, mask,
    scale, layout) in (B, H, N, D)); decides per home device, then splits or serves
    the call on its device."""

    def __init__(self, group: "HeadGroup", call: CallSignature, rest: Priority) -> None:
        self.group = group
        self.call = call
        self.rest = rest
        # Calls served on their device because another thread's split was in flight.
        self.busy = itertools.count()
        self._decisions: dict[torch.device, _Decision] = {}

    def decisions(self) -> list[_Decision]:
        return list(self._decisions.values())

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                 scale: Optional[float], layout: str = "") -> torch.Tensor:
        while True:
            decision = self._decisions.get(q.device)
            if decision is None or decision.generation != self.group.generation:
                decision = self._decide(q.device)
            if not decision.split:
                next(decision.counter)
                return decision.local(q, k, v, mask, scale)
            if not self.group.lock.acquire(blocking=False):
                next(self.busy)
                return decision.local(q, k, v, mask, scale)
            try:
                out = self._split(decision, q, k, v, mask, scale)
                next(decision.counter)
                return out
            except _LaneFailed as failure:
                self.group.drop(failure.device, failure.reason)
            finally:
                self.group.lock.release()

    def _decide(self, home: torch.device) -> _Decision:
        group = self.group
        with group.plan_lock:
            generation = group.generation
            choice = group.policy.choose(self.call, home, group.usable(), group.link, group.room)
            decision = _Decision(home, choice, generation, self._attend(group.dispatcher(home, self.rest, _LOCAL)))
            if choice.split:
                lanes, seen = [], {}
                for share in choice.shares:
                    if share.device == home and decision.home_share is None:
                        decision.home_share = share
                        decision.home_attend = self._attend(group.dispatcher(home, self.rest, _SHARE))
                        continue
                    ordinal = seen[share.device] = seen.get(share.device, -1) + 1
                    lanes.append((share, group.lane(home, share.device, ordinal),
                                  self._attend(group.dispatcher(share.device, self.rest, _SHARE))))
                decision.lanes = tuple(lanes)
                decision.ready = torch.cuda.Event() if home.type == "cuda" else None
            self._decisions[home] = decision
        return decision

    def _attend(self, dispatcher: Dispatcher) -> Attend:
        precision, low_precision = self.call.attn_precision, self.call.low_precision_ok

        def attend(q, k, v, mask, scale):
            return dispatcher(q, k, v, q.shape[1], mask, skip_reshape=True, skip_output_reshape=True, scale=scale,
                              attn_precision=precision, low_precision=low_precision)
        return attend

    def _split(self, decision: _Decision, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Optional[torch.Tensor], scale: Optional[float]) -> torch.Tensor:
        batch, heads, seq_q, _ = q.shape
        if self.call.layout_out == FLAT:  # token-major memory: the caller's (B, N, H*D) view is free
            out = torch.empty(batch, seq_q, heads, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
        else:
            out = torch.empty(batch, heads, seq_q, v.shape[-1], dtype=q.dtype, device=q.device)
        main = caller_stream(q.device)
        sample = None
        if main is not None:
            if len(decision.timings) < TIMED_CALLS:
                sample = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True),
                          [LaneTiming.new() for _ in decision.lanes])
                sample[0].record(main)
            decision.ready.record(main)
        started: list[Lane] = []
        try:
            for index, (share, lane, attend) in enumerate(decision.lanes):
                started.append(lane)
                try:
                    lane.run(_inputs(share, q, k, v, mask), scale, attend, out[:, share.q_start:share.q_stop],
                             decision.ready, None if sample is None else sample[2][index])
                except Exception as error:
                    raise _LaneFailed(share.device, error) from error
            share = decision.home_share
            if share is not None:
                # Triton-based kernels launch on the current device, which a caller's
                # thread may have left on another GPU.
                with torch.cuda.device(q.device) if main is not None else contextlib.nullcontext():
                    result = decision.home_attend(*_inputs(share, q, k, v, mask), scale)
                out[:, share.q_start:share.q_stop].copy_(result)
        except BaseException:
            if main is not None:
                for lane in started:
                    lane.wait_all(main)
            raise
        if main is not None:
            for _, lane, _ in decision.lanes:
                main.wait_event(lane.done)
            if sample is not None:
                sample[1].record(main)
                decision.timings.append(sample)
        return out


def _inputs(share: Share, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> Inputs:
    kv = slice(share.kv_start, share.kv_stop)
    heads = slice(share.q_start, share.q_stop)
    if mask is not None and mask.shape[1] > 1:  # per-head mask (the dispatcher made it 4-D)
        mask = mask[:, heads]
    return q[:, heads], k[:, kv], v[:, kv], mask


class HeadGroup:
    """The devices head-parallel attention may use, with their lanes, links, dispatchers,
    dropped members and counters.

    devices: default ATTENTION_BACKENDS_DEVICES, else every visible GPU.
    policy: decides splits (default: ATTENTION_BACKENDS_HEAD_SPLIT, else the cost model).
    staging: "auto" (pinned host memory where two GPUs have no peer access) or "always"
        (every copy through pinned host memory, even between shares on one GPU).
    measure_links: time each device pair once when first needed (else assumed speeds).
    """

    def __init__(self, devices: Optional[str | Iterable[str | int | torch.device]] = None, *,
                 policy: Optional[SplitPolicy] = None, staging: str = "auto", measure_links: bool = True) -> None:
        self.problems_found: list[str] = []
        if devices is None:
            devices = os.environ.get(ENV_DEVICES) or visible_devices()
        try:
            self.devices = parse_devices(devices)
        except ValueError as error:
            self.devices = ()
            self.problems_found.append(f"{ENV_DEVICES}: {error}")
        if staging not in STAGING:
            raise ValueError(f"staging must be one of {', '.join(STAGING)}, not {staging!r}")
        self.policy = policy if policy is not None else _policy_from_env()
        self.staging = staging
        self.measure_links = measure_links
        self.generation = 0
        self.lock = threading.Lock()
        self.plan_lock = threading.RLock()
        self._dropped: dict[torch.device, str] = {}
        self._links: dict[tuple[torch.device, torch.device], Link] = {}
        self._lanes: dict[tuple[torch.device, torch.device, int], Lane] = {}
        self._dispatchers: dict[tuple[torch.device, tuple[str, ...], str], Dispatcher] = {}
        self._kernels: "weakref.WeakSet[HeadSplitKernel]" = weakref.WeakSet()
        self._direct: dict[CallSignature, HeadSplitKernel] = {}

    # -- membership -----------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why this group cannot split any call (empty when it can)."""
        found = list(self.problems_found)
        if not self.devices and not found:
            if torch.cuda.is_available():
                found.append(f"the device list is empty: name two or more GPUs in {ENV_DEVICES}, e.g. 0,1")
            else:
                found.append(f"no CUDA GPU is visible: head_parallel splits a call's heads across GPUs ({ENV_DEVICES} "
                             f"lists them; 'cpu,cpu' runs the split on the CPU, for testing)")
        elif len(self.devices) == 1:
            found.append(f"one device in the group ({self.devices[0]}): head_parallel needs two or more; list them "
                         f"in {ENV_DEVICES}, e.g. 0,1")
        types = {d.type for d in self.devices}
        if len(types) > 1:
            found.append(f"the group mixes device types ({', '.join(sorted(types))}); list devices of one type")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for device in self.devices:
            if device.type == "cuda" and device.index >= count:
                found.append(f"{device} is not visible here ({count} CUDA devices)")
        return found

    def usable(self) -> tuple[torch.device, ...]:
        return tuple(d for d in self.devices if d not in self._dropped)

    def drop(self, device: torch.device, reason: str) -> None:
        """Take `device` out of every later split (logged once)."""
        with self.plan_lock:
            if device in self._dropped:
                return
            self._dropped[device] = reason
            self.generation += 1
        log.warning("attention backends: %s dropped out of head_parallel: %s; its shares go to the other devices "
                    "(readmitted when the group is configured again)", device, reason)

    def dropped(self) -> dict[str, str]:
        return {str(d): why for d, why in self._dropped.items()}

    def readmit(self) -> None:
        with self.plan_lock:
            self._dropped.clear()
            self.generation += 1

    # -- what splits are made of -----------------------------------------------------

    def link(self, home: torch.device, remote: torch.device) -> Link:
        key = (home, remote)
        link = self._links.get(key)
        if link is None:
            # "always" stages even within one GPU: how a single GPU tests the staged path.
            staged = home.type == "cuda" and (self.staging == "always" or not has_peer_access(home, remote))
            if self.measure_links and home.type == "cuda" and (home != remote or staged):
                link = measured_link(home, remote, staged)
            else:
                link = assumed_link(home, remote, staged)
            self._links[key] = link
        return link

    def room(self, device: torch.device) -> Optional[int]:
        """Free bytes on `device` (None off CUDA: no limit the model can know)."""
        return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None

    def lane(self, home: torch.device, remote: torch.device, ordinal: int) -> Lane:
        key = (home, remote, ordinal)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane(home, remote, self.link(home, remote))
        return lane

    def dispatcher(self, device: torch.device, rest: Priority, role: str) -> Dispatcher:
        priority = rest.without(HEAD_PARALLEL) or parse_priority(AUTO)
        key = (device, priority, role)
        dispatcher = self._dispatchers.get(key)
        if dispatcher is None:
            dispatcher = self._dispatchers[key] = Dispatcher(priority)
        return dispatcher

    def bind(self, call: CallSignature, rest: Priority = NOTHING_AFTER) -> HeadSplitKernel:
        """The kernel for calls shaped like `call`; `rest`: the priority after head_parallel."""
        kernel = HeadSplitKernel(self, call, rest)
        with self.plan_lock:
            self._kernels.add(kernel)
        return kernel

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                 scale: Optional[float], layout: str = "") -> torch.Tensor:
        """A plain kernel (B, H, N, D) -> (B, H, N, Dv) with `auto` on every device, for
        callers that hold the backend's kernel rather than a Dispatcher plan."""
        call = describe_call(q, k, v, q.shape[1], mask, skip_reshape=True, skip_output_reshape=True,
                             custom_scale=scale is not None)
        kernel = self._direct.get(call)
        if kernel is None:
            kernel = self._direct[call] = self.bind(call)
        return kernel(q, k, v, mask, scale, layout)

    # -- runs ------------------------------------------------------------------------

    def begin_run(self) -> None:
        """Zero the counters and timings (decisions stay)."""
        with self.plan_lock:
            for kernel in list(self._kernels):
                kernel.busy = itertools.count()
                for decision in kernel.decisions():
                    decision.counter = itertools.count()
                    decision.timings.clear()
            for dispatcher in self._dispatchers.values():
                dispatcher.reset_counters()

    def end_run(self) -> dict:
        """The run's summary, then the cached memory of the run handed back."""
        summary = self.run_summary()
        self.release()
        return summary

    def release(self) -> None:
        """Return the memory PyTorch cached for this run's shares to the driver (every
        device's unused cache, as ComfyUI's own soft_empty_cache does) and the pinned
        host blocks of staged copies."""
        if not any(d.type == "cuda" for d in self.devices):
            return
        torch.cuda.empty_cache()
        empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
        if empty_host_cache is not None:
            empty_host_cache()

    def run_summary(self) -> dict:
        """Calls split and kept local, per-device shares, bytes moved and transfer time."""
        devices: dict[str, dict] = {}
        signatures, split_calls, local_calls, busy = [], 0, 0, 0
        with self.plan_lock:
            kernels = list(self._kernels)
        for kernel in kernels:
            busy += count_value(kernel.busy)
            traffic = Traffic(kernel.call)
            for decision in kernel.decisions():
                if not decision.calls:
                    continue
                row = {"signature": kernel.call.describe(), "home": str(decision.home), "calls": decision.calls,
                       "split": decision.split, "decision": decision.choice.reason,
                       "prediction": None if decision.choice.prediction is None
                       else decision.choice.prediction.to_json()}
                signatures.append(row)
                if not decision.split:
                    local_calls += decision.calls
                    continue
                split_calls += decision.calls
                row["timed_call_ms"] = _add_shares(devices, decision, traffic)
        total_flops = sum(d["flops"] for d in devices.values())
        for entry in devices.values():
            entry["work_share"] = round(entry.pop("flops") / total_flops, 4) if total_flops else 0.0
            timed, lane_ms, kernel_ms = entry.pop("timed"), entry.pop("lane_ms"), entry.pop("kernel_ms")
            # Time on the lane that was not the kernel: packing and both copies.
            entry["transfer_ms_per_call"] = round((lane_ms - kernel_ms) / timed, 3) if timed else None
            entry["mib_in"] = round(entry.pop("bytes_in") / 2**20, 1)
            entry["mib_out"] = round(entry.pop("bytes_out") / 2**20, 1)
        return {"devices": [str(d) for d in self.devices], "dropped": self.dropped(),
                "split_calls": split_calls, "local_calls": local_calls, "busy_calls": busy,
                "per_device": sorted(devices.values(), key=lambda e: e["device"]),
                "served": self._served(), "signatures": sorted(signatures, key=lambda r: -r["calls"])}

    def _served(self) -> dict[str, dict[str, int]]:
        """Calls (shares and whole calls) each physical device's dispatchers served, by backend."""
        served: dict[str, dict[str, int]] = {}
        with self.plan_lock:
            dispatchers = list(self._dispatchers.items())
        for (device, _, _), dispatcher in dispatchers:
            counts = served.setdefault(str(device), {})
            for name, calls in dispatcher.counters().served.items():
                counts[name] = counts.get(name, 0) + calls
        return {device: counts for device, counts in served.items() if counts}

    def describe(self) -> dict:
        """What the status route shows of the group."""
        with self.plan_lock:
            links = list(self._links.items())
        return {"devices": [str(d) for d in self.devices], "problems": self.problems(), "dropped": self.dropped(),
                "policy": type(self.policy).__name__, "staging": self.staging,
                "links": [{"from": str(h), "to": str(r), **link.to_json()} for (h, r), link in links]}


def _add_shares(devices: dict[str, dict], decision: _Decision, traffic: Traffic) -> Optional[float]:
    """Add one split decision's shares to the per-device totals; the mean timed call ms."""
    shares = [(decision.home_share, None)] if decision.home_share is not None else []
    shares += [(share, index) for index, (share, _, _) in enumerate(decision.lanes)]
    read = []
    for start, end, lane_timings in decision.timings:
        end.synchronize()
        read.append((start.elapsed_time(end), [timing.read_ms() for timing in lane_timings]))
    seen: dict[torch.device, int] = {}
    for share, lane_index in shares:
        # A device listed twice (tests, single-GPU stream checks) gets "cuda:0#2".
        seen[share.device] = seen.get(share.device, 0) + 1
        label = str(share.device) + (f"#{seen[share.device]}" if seen[share.device] > 1 else "")
        entry = devices.setdefault(label, {
            "device": label, "calls": 0, "heads": 0, "flops": 0.0, "bytes_in": 0.0, "bytes_out": 0.0,
            "timed": 0, "lane_ms": 0.0, "kernel_ms": 0.0})
        entry["calls"] += decision.calls
        entry["heads"] += share.heads * decision.calls
        entry["flops"] += traffic.flops(share.heads) * decision.calls
        if lane_index is None:
            continue
        entry["bytes_in"] += traffic.bytes_in(share) * decision.calls
        entry["bytes_out"] += traffic.bytes_out(share) * decision.calls
        for _, lane_ms in read:
            entry["timed"] += 1
            entry["lane_ms"] += lane_ms[lane_index][0]
            entry["kernel_ms"] += lane_ms[lane_index][1]
    return round(sum(ms for ms, _ in read) / len(read), 3) if read else None


def _policy_from_env() -> SplitPolicy:
    name = os.environ.get(ENV_SPLIT, "cost").strip() or "cost"
    if name not in SPLIT_POLICIES:
        raise ValueError(f"{ENV_SPLIT}={name!r}: choose one of {', '.join(SPLIT_POLICIES)}")
    return SPLIT_POLICIES[name]()


_default: Optional[HeadGroup] = None
_default_lock = threading.Lock()


def default_group() -> HeadGroup:
    """The group `head_parallel` uses (made from the environment on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = HeadGroup()
        return _default


def configure(devices: Optional[str | Iterable[str | int | torch.device]] = None, *,
              policy: Optional[SplitPolicy] = None, staging: str = "auto", measure_links: bool = True) -> HeadGroup:
    """Replace the group `head_parallel` uses; Dispatcher plans made before keep the old
    one (`Dispatcher.clear()` forgets them)."""
    global _default
    group = HeadGroup(devices, policy=policy, staging=staging, measure_links=measure_links)
    with _default_lock:
        _default = group
    from .. import registry
    registry.get(HEAD_PARALLEL).reset_availability()
    return group
