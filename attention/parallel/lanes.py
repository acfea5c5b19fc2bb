"""One remote share's path through the GPUs: copy in, attend there, copy back.

A lane belongs to one (home device, other device) pair and owns two streams: a copy
stream on the home device and a compute stream on the other device. The caller's stream
records `ready` once per call; every lane waits for it, so the caller never blocks and
no host synchronisation happens. The lane's `done` event, recorded after its output is
in place, is what the caller's stream waits for before it goes on.

How data moves (PyTorch orders a cross-device copy on the source device's current stream
and makes both devices' current streams wait around it):
- peer: `.to(other)` runs on the copy stream (the home device's current stream inside
  the lane), `.to(home)` on the compute stream; no host memory involved.
- staged (no peer access): device-to-host into pinned memory on the source's stream, an
  event, host-to-device on the destination's stream. PyTorch cannot see through the host
  buffer, so the event is what orders the two halves; the pinned blocks are kept by
  PyTorch's host allocator until both copies are done.
- same device (a device listed twice, or CPU "devices"): nothing moves; tensors that
  cross between the lane's streams are marked with `record_stream`, so the caching
  allocator does not hand their memory to the other stream too early.

Memory on the other device is what one call's share needs (its inputs, its output and
the kernel's workspace), allocated on the lane's compute stream and returned to PyTorch's
cache when the call's Python references go; `HeadGroup.end_run` hands the cache back.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .cost import SAME_DEVICE, STAGED, Link

# (q, k, v, mask, scale) on one device -> output in (B, H, N, Dv)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[float]], torch.Tensor]
Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


@dataclasses.dataclass
class LaneTiming:
    """CUDA events of one timed call of a lane: the lane from its start on the home
    device to its output in place, and the kernel on the other device."""

    start: torch.cuda.Event
    end: torch.cuda.Event
    kernel_start: torch.cuda.Event
    kernel_end: torch.cuda.Event

    @classmethod
    def new(cls) -> "LaneTiming":
        return cls(*(torch.cuda.Event(enable_timing=True) for _ in range(4)))

    def read_ms(self) -> tuple[float, float]:
        """(lane ms, kernel ms); synchronises with the recorded events."""
        self.end.synchronize()
        self.kernel_end.synchronize()
        return self.start.elapsed_time(self.end), self.kernel_start.elapsed_time(self.kernel_end)


class Lane:
    def __init__(self, home: torch.device, remote: torch.device, link: Link) -> None:
        self.home = home
        self.remote = remote
        self.link = link
        self.cuda = home.type == "cuda"
        self.moves = link.kind != SAME_DEVICE
        self.staged = link.kind == STAGED
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(home)
            self.stream = torch.cuda.Stream(remote)
            self.sent = torch.cuda.Event()
            self.returned = torch.cuda.Event()
            self.done = torch.cuda.Event()

    def run(self, inputs: Inputs, scale: Optional[float], attend: Attend, out: torch.Tensor,
            ready: Optional[torch.cuda.Event], timing: Optional[LaneTiming] = None) -> None:
        """Serve one share: `inputs` are views of the caller's tensors on the home device,
        `out` the view of the caller's output this share fills."""
        if not self.cuda:
            q, k, v, mask = inputs
            out.copy_(attend(q, k, v, mask, scale))
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(ready)
            if timing is not None:
                timing.start.record(self.copy_stream)
            # Packed on the copy stream: one contiguous block per tensor, so the link
            # copy is a plain memcpy (a no-op when the share is contiguous already).
            packed = tuple(None if t is None else t.contiguous() for t in inputs)
            # Entering the compute stream also makes the other device current, which
            # Triton-based kernels need to launch there.
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                q, k, v, mask = self._send(packed)
                if timing is not None:
                    timing.kernel_start.record(self.stream)
                result = attend(q, k, v, mask, scale)
                if timing is not None:
                    timing.kernel_end.record(self.stream)
                back = self._receive(result)
            self.copy_stream.wait_stream(self.stream)
            out.copy_(back)
            if timing is not None:
                timing.end.record(self.copy_stream)
            self.done.record(self.copy_stream)

    def wait_all(self, stream: torch.cuda.Stream) -> None:
        """Make `stream` wait for everything this lane has enqueued (after a failure)."""
        if self.cuda:
            stream.wait_stream(self.copy_stream)
            stream.wait_stream(self.stream)

    def _send(self, packed: tuple) -> tuple:
        if not self.moves:
            for t in packed:
                if t is not None:
                    t.record_stream(self.stream)
            return packed
        if not self.staged:
            return tuple(None if t is None else t.to(self.remote, non_blocking=True) for t in packed)
        hosts = tuple(None if t is None else t.to("cpu", non_blocking=True) for t in packed)
        self.sent.record(self.copy_stream)
        self.stream.wait_event(self.sent)
        return tuple(None if h is None else h.to(self.remote, non_blocking=True) for h in hosts)

    def _receive(self, result: torch.Tensor) -> torch.Tensor:
        if not self.moves:
            result.record_stream(self.copy_stream)
            return result
        if not self.staged:
            return result.to(self.home, non_blocking=True)
        host = result.to("cpu", non_blocking=True)
        self.returned.record(self.stream)
        self.copy_stream.wait_event(self.returned)
        return host.to(self.home, non_blocking=True)


def caller_stream(device: torch.device) -> Optional[torch.cuda.Stream]:
    return torch.cuda.current_stream(device) if device.type == "cuda" else None
