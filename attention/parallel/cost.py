"""How a call's heads are divided between devices, and whether dividing them pays.

The unit of division is one key head with its query heads (a GQA group; one query head
without GQA), so every share is a complete attention problem that any kernel can serve
and the outputs only need to be laid side by side.

The cost model predicts, once per call signature and home device, the time of the call
on the home device alone and split across the first n devices of the group for every
n and every number of units kept at home, and picks the fastest. A split is taken when
it is predicted at least `min_gain` times faster; calls too small to gain stay local.
Kernel time comes from the fitted per-kernel model `auto` uses (attention/cost_model.py:
the fastest kernel that may serve the share, host path included) where the GPU class has
one, else from a throughput table.
Transfers are modelled conservatively: the inputs of every remote share leave the home
device one after another (they share its links), each remote computes once its inputs
have all arrived, and the outputs come back one after another.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Protocol, Sequence

import torch

from .. import cost_store, registry
from ..call import MASK_ADDITIVE, CallSignature, canonical_mask_shape, device_capability
from ..cost_model import allowed_by_accuracy
from ..priority import device_class

# Link kinds between the home device and another device of the group.
SAME_DEVICE = "same device"  # the same memory: nothing moves (also every CPU "device")
PEER = "peer"                # direct GPU-to-GPU copies (NVLink or PCIe peer access)
STAGED = "staged"            # through pinned host memory: no peer access between the GPUs

# Effective attention throughput (TFLOP/s, 4·B·H·Nq·Nk·D counted) of the fastest kernel
# per device class, where no fitted kernel model exists. sm90: the H200's video-shape
# rows of benchmarks/results/h200/kernels.md (sdpa 573-587, sage FP8 741-779). The
# others are assumptions; they only move the size at which splitting starts to pay.
_TFLOPS = {"sm90": 750.0, "sm100": 1500.0, "sm120": 400.0, "sm89": 300.0, "sm80": 250.0, "default": 100.0}
_CPU_TFLOPS = 0.5


def device_tflops(device: torch.device) -> float:
    """The attention throughput the table assumes for `device`."""
    if device.type != "cuda":
        return _CPU_TFLOPS
    return _TFLOPS[device_class("cuda", device_capability(device))]


# ms for `heads` query heads (whole key-head groups) of a call on a device.
KernelTime = Callable[[CallSignature, int, torch.device], float]


def at_tflops(tflops: Callable[[torch.device], float]) -> KernelTime:
    """Kernel time from a throughput per device."""
    def kernel_ms(call: CallSignature, heads: int, device: torch.device) -> float:
        return Traffic(call).flops(heads) / (tflops(device) * 1e9)
    return kernel_ms


def share_call(call: CallSignature, heads: int, device: torch.device) -> CallSignature:
    """The call a device serves for `heads` query heads of `call`."""
    group = call.heads_q // call.heads_kv
    per_head = call.mask_shape is not None and canonical_mask_shape(call.mask_shape)[1] == call.heads_q > 1
    mask_shape = call.mask_shape
    if per_head:
        mask_shape = (canonical_mask_shape(mask_shape)[0], heads) + tuple(canonical_mask_shape(mask_shape)[2:])
    return dataclasses.replace(call, device_type=device.type, compute_capability=device_capability(device),
                               heads_q=heads, heads_kv=heads // group, mask_shape=mask_shape)


def predicted_kernel_ms(call: CallSignature, heads: int, device: torch.device) -> float:
    """The fastest kernel that may serve `heads` of the call on `device`, by the GPU
    class's fitted model (what `auto` decides with); the throughput table without one."""
    share = share_call(call, heads, device)
    model = cost_store.model_for(share.device_type, share.compute_capability)
    if model is not None:
        usable = [b.name for b in registry.all_backends()
                  if b.name in model.kernels and not b.sparse and b.availability().available
                  and not b.call_reasons(share) and allowed_by_accuracy(b.name, b.quantized, share)]
        predicted = model.predictions(share, usable)
        if predicted:
            return min(predicted.values()) / 1e3
    return at_tflops(device_tflops)(call, heads, device)


@dataclasses.dataclass(frozen=True)
class Link:
    """How data moves between the home device and one other device."""

    kind: str
    gbps: float    # GB/s in each direction; inf for SAME_DEVICE
    source: str    # "measured", "nvidia-smi NV18", "assumed", ...

    def ms(self, nbytes: float) -> float:
        return 0.0 if math.isinf(self.gbps) else nbytes / (self.gbps * 1e6)

    def to_json(self) -> dict:
        return {"kind": self.kind, "gbps": None if math.isinf(self.gbps) else round(self.gbps, 1),
                "source": self.source}


SAME = Link(SAME_DEVICE, math.inf, "same memory")


@dataclasses.dataclass(frozen=True)
class Share:
    """Key heads [kv_start, kv_stop) and their query heads, served on `device`."""

    device: torch.device
    kv_start: int
    kv_stop: int
    group: int  # query heads per key head

    @property
    def q_start(self) -> int:
        return self.kv_start * self.group

    @property
    def q_stop(self) -> int:
        return self.kv_stop * self.group

    @property
    def heads(self) -> int:
        return self.q_stop - self.q_start

    def describe(self) -> str:
        return f"{self.device}: heads {self.q_start}-{self.q_stop - 1}"


def apportion(units: int, weights: Sequence[float]) -> list[int]:
    """`units` divided in proportion to `weights`, largest remainders first (ties to the
    earlier entry), so the counts always add up to `units`."""
    total = float(sum(weights))
    if units <= 0 or total <= 0:
        return [0] * len(weights)
    exact = [units * w / total for w in weights]
    counts = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:units - sum(counts)]:
        counts[i] += 1
    return counts


def make_shares(devices: Sequence[torch.device], counts: Sequence[int], group: int) -> tuple[Share, ...]:
    """Consecutive key-head ranges of the given sizes; devices with none are left out."""
    shares, start = [], 0
    for device, count in zip(devices, counts):
        if count:
            shares.append(Share(device, start, start + count, group))
            start += count
    return tuple(shares)


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Bytes a share of `heads` query heads sends and receives, for one call."""

    call: CallSignature

    @property
    def itemsize(self) -> int:
        return self.call.dtype.itemsize

    def mask_bytes(self, heads: int) -> float:
        call = self.call
        if not call.mask_shape:
            return 0.0
        shape = canonical_mask_shape(call.mask_shape)
        per_element = self.itemsize if call.mask_kind == MASK_ADDITIVE else 1  # integer masks become bool
        elements = math.prod(shape)
        if self.per_head_mask:
            elements = elements // shape[1] * heads
        return float(elements * per_element)

    @property
    def per_head_mask(self) -> bool:
        shape = self.call.mask_shape
        return bool(shape) and canonical_mask_shape(shape)[1] == self.call.heads_q > 1

    def bytes_in(self, share: Share) -> float:
        call = self.call
        q = call.batch * share.heads * call.seq_q * call.head_dim
        kv = call.batch * (share.kv_stop - share.kv_start) * call.seq_k * (call.head_dim + call.head_dim_v)
        return float((q + kv) * self.itemsize) + self.mask_bytes(share.heads)

    def bytes_out(self, share: Share) -> float:
        call = self.call
        return float(call.batch * share.heads * call.seq_q * call.head_dim_v * self.itemsize)

    def flops(self, heads: int) -> float:
        call = self.call
        return 2.0 * call.batch * heads * call.seq_q * call.seq_k * (call.head_dim + call.head_dim_v)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The cost model's view of one way to serve a call."""

    shares: tuple[Share, ...]
    single_ms: float      # the whole call on the home device
    split_ms: float       # this division, transfers and overheads included
    transfer_ms: float    # inputs out plus outputs back, on the links
    remote_bytes: float   # inputs and outputs held on the other devices during one call

    @property
    def gain(self) -> float:
        return self.single_ms / self.split_ms if self.split_ms > 0 else 1.0

    def describe(self) -> str:
        return (f"predicted {self.gain:.2f}x on {len(self.shares)} devices ({self.split_ms:.2f} ms against "
                f"{self.single_ms:.2f} ms, {self.transfer_ms:.2f} ms on links)")

    def to_json(self) -> dict:
        return {"devices": [str(s.device) for s in self.shares], "heads": [s.heads for s in self.shares],
                "single_ms": round(self.single_ms, 3), "split_ms": round(self.split_ms, 3),
                "transfer_ms": round(self.transfer_ms, 3), "gain": round(self.gain, 3),
                "remote_mib": round(self.remote_bytes / 2**20, 1)}


@dataclasses.dataclass(frozen=True)
class Choice:
    """What a policy decided for a call on one home device: shares to split into (empty:
    run on the home device alone) and why."""

    shares: tuple[Share, ...]
    reason: str
    prediction: Optional[Prediction] = None

    @property
    def split(self) -> bool:
        return bool(self.shares)


LinkOf = Callable[[torch.device, torch.device], Link]
RoomOf = Callable[[torch.device], Optional[int]]  # free bytes on a device, None: unknown / unlimited


class SplitPolicy(Protocol):
    def choose(self, call: CallSignature, home: torch.device, devices: Sequence[torch.device],
               link: LinkOf, room: RoomOf) -> Choice:
        """How to serve `call` arriving on `home` with the group's usable `devices`."""


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Splits a call when the prediction says it gains at least `min_gain`.

    overhead_ms: host and synchronisation cost per remote share (stream switches, the
        copies' launches, events, the remote dispatcher's lookup).
    memory_headroom: a remote device takes a share only when its free memory is at
        least this many times the share's inputs and outputs (the kernel's own workspace
        and whatever else runs there need the rest).
    kernel_ms: kernel time of a share (default: `predicted_kernel_ms`).
    """

    min_gain: float = 1.2
    overhead_ms: float = 0.15
    memory_headroom: float = 2.0
    kernel_ms: KernelTime = predicted_kernel_ms

    def predict(self, call: CallSignature, home: torch.device, shares: Sequence[Share], link: LinkOf) -> Prediction:
        traffic = Traffic(call)
        # Shares on one physical device run one after another: they add up on it.
        busy: dict[torch.device, float] = {}
        for share in shares:
            busy[share.device] = busy.get(share.device, 0.0) + self.kernel_ms(call, share.heads, share.device)
        remote = [s for s in shares if s.device != home]
        ms_in = sum(link(home, s.device).ms(traffic.bytes_in(s)) for s in remote)
        ms_out = sum(link(home, s.device).ms(traffic.bytes_out(s)) for s in remote)
        finish = busy.get(home, 0.0)
        for share in remote:
            finish = max(finish, ms_in + busy[share.device] + ms_out)
        finish += self.overhead_ms * len(remote)
        return Prediction(tuple(shares), self.kernel_ms(call, call.heads_q, home), finish, ms_in + ms_out,
                          sum(traffic.bytes_in(s) + traffic.bytes_out(s) for s in remote))

    def choose(self, call: CallSignature, home: torch.device, devices: Sequence[torch.device],
               link: LinkOf, room: RoomOf) -> Choice:
        group = call.heads_q // call.heads_kv
        traffic = Traffic(call)
        candidates = _home_first(home, devices)
        model = dataclasses.replace(self, kernel_ms=_remembered(self.kernel_ms))  # each share size predicted once
        best: Optional[Prediction] = None
        short_of_memory: list[str] = []
        for n in range(2, len(candidates) + 1):
            chosen = candidates[:n]
            keeps_home = chosen[0] == home
            remotes = chosen[1:] if keeps_home else chosen
            weights = [1.0 / max(model.kernel_ms(call, call.heads_q, d), 1e-9) for d in remotes]
            for at_home in range(call.heads_kv + 1) if keeps_home else (0,):
                counts = apportion(call.heads_kv - at_home, weights)
                shares = make_shares(([home] if keeps_home else []) + list(remotes),
                                     ([at_home] if keeps_home else []) + counts, group)
                if len(shares) < 2 and (not shares or shares[0].device == home):
                    continue
                lacking = self._lacking_memory(traffic, shares, home, room)
                if lacking:
                    short_of_memory.append(lacking)
                    continue
                prediction = model.predict(call, home, shares, link)
                if best is None or prediction.split_ms < best.split_ms:
                    best = prediction
        if best is None:
            why = short_of_memory[0] if short_of_memory else "no other device in the group can take a share"
            return Choice((), why)
        if best.gain < self.min_gain:
            return Choice((), f"too small to gain: {best.describe()}, below {self.min_gain}x", best)
        return Choice(best.shares, best.describe(), best)

    def _lacking_memory(self, traffic: Traffic, shares: Sequence[Share], home: torch.device,
                        room: RoomOf) -> Optional[str]:
        for share in shares:
            if share.device == home:
                continue
            free = room(share.device)
            need = self.memory_headroom * (traffic.bytes_in(share) + traffic.bytes_out(share))
            if free is not None and free < need:
                return (f"{share.device} has {free / 2**30:.1f} GiB free, a share of {share.heads} heads needs "
                        f"{need / 2**30:.1f} GiB")
        return None


@dataclasses.dataclass(frozen=True)
class EvenSplit:
    """Every usable device of the group takes an equal share (within one unit), whatever
    the prediction says: for measuring splits the cost model would refuse, and for
    tests. The prediction is still attached for the record."""

    cost: CostModel = CostModel()

    def choose(self, call: CallSignature, home: torch.device, devices: Sequence[torch.device],
               link: LinkOf, room: RoomOf) -> Choice:
        candidates = _home_first(home, devices)
        counts = apportion(call.heads_kv, [1.0] * len(candidates))
        shares = make_shares(candidates, counts, call.heads_q // call.heads_kv)
        if len(shares) < 2 and (not shares or shares[0].device == home):
            return Choice((), "fewer than two devices can take a share")
        prediction = self.cost.predict(call, home, shares, link)
        return Choice(shares, "even split (forced): " + prediction.describe(), prediction)


def _home_first(home: torch.device, devices: Sequence[torch.device]) -> list[torch.device]:
    """The group's devices of the home device's type, the home device first when it is
    a member (it needs no transfer), the others in the group's order."""
    same_type = [d for d in devices if d.type == home.type]
    if home in same_type:
        same_type.remove(home)
        return [home] + same_type
    return same_type


def _remembered(kernel_ms: KernelTime) -> KernelTime:
    """`kernel_ms` asked once per (heads, device) for one call."""
    known: dict[tuple[int, torch.device], float] = {}

    def remembered(call: CallSignature, heads: int, device: torch.device) -> float:
        key = (heads, device)
        if key not in known:
            known[key] = kernel_ms(call, heads, device)
        return known[key]
    return remembered
