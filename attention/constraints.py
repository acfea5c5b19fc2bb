"""Per-call constraints as data.

Each constraint answers one question about a `CallSignature` with either None (fine)
or a sentence saying why the backend cannot serve the call. A backend's constraints
are a tuple of these, so `doctor`, the README and the tests can list them, and the
dispatcher can collect every reason at once, xFormers' `not_supported_reasons` style.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Protocol

import torch

from .call import MASK_NONE, CallSignature, canonical_mask_shape


class Constraint(Protocol):
    def reason(self, call: CallSignature) -> Optional[str]:
        """None if the call satisfies the constraint, else why not."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _cc(cc: tuple[int, int]) -> str:
    return "sm%d%d" % cc


@dataclasses.dataclass(frozen=True)
class DeviceTypes:
    allowed: frozenset[str]

    def reason(self, call: CallSignature) -> Optional[str]:
        if call.device_type in self.allowed:
            return None
        return f"runs on {'/'.join(sorted(self.allowed))} only, not {call.device_type}"


@dataclasses.dataclass(frozen=True)
class ComputeCapability:
    """CUDA compute capability window, inclusive; `maximum` None means no upper bound."""

    minimum: tuple[int, int]
    maximum: Optional[tuple[int, int]] = None

    def reason(self, call: CallSignature) -> Optional[str]:
        cc = call.compute_capability
        if cc is None:
            return None  # DeviceTypes already speaks for non-CUDA devices
        if cc < self.minimum:
            return f"needs {_cc(self.minimum)} or newer, this GPU is {_cc(cc)}"
        if self.maximum is not None and cc > self.maximum:
            return f"supports up to {_cc(self.maximum)}, this GPU is {_cc(cc)}"
        return None


@dataclasses.dataclass(frozen=True)
class CapabilityFamilies:
    """CUDA major versions a kernel is built for (e.g. FA3 is Hopper-only: {9})."""

    majors: frozenset[int]

    def reason(self, call: CallSignature) -> Optional[str]:
        cc = call.compute_capability
        if cc is None or cc[0] in self.majors:
            return None
        names = ", ".join(f"sm{m}x" for m in sorted(self.majors))
        return f"built for {names} only, this GPU is {_cc(cc)}"


@dataclasses.dataclass(frozen=True)
class DTypes:
    allowed: frozenset[torch.dtype]

    def reason(self, call: CallSignature) -> Optional[str]:
        if call.dtype in self.allowed:
            return None
        names = "/".join(sorted(_dtype_name(d) for d in self.allowed))
        return f"takes {names}, not {_dtype_name(call.dtype)}"


@dataclasses.dataclass(frozen=True)
class HeadDims:
    """Head dim (of q/k and of v) within [minimum, maximum], a multiple of `multiple_of`,
    or, when `allowed` is set, exactly one of those values."""

    minimum: int = 1
    maximum: int = 1 << 30
    multiple_of: int = 1
    allowed: Optional[frozenset[int]] = None
    equal_v: bool = False

    def reason(self, call: CallSignature) -> Optional[str]:
        if self.equal_v and call.head_dim_v != call.head_dim:
            return f"needs the same head dim for v ({call.head_dim_v}) as for q/k ({call.head_dim})"
        for d in {call.head_dim, call.head_dim_v}:
            if self.allowed is not None:
                if d not in self.allowed:
                    return f"head dim {d} not in {sorted(self.allowed)}"
            elif not (self.minimum <= d <= self.maximum) or d % self.multiple_of:
                rule = f"{self.minimum}..{self.maximum}"
                if self.multiple_of > 1:
                    rule += f", a multiple of {self.multiple_of}"
                return f"head dim {d} outside {rule}"
        return None


@dataclasses.dataclass(frozen=True)
class Masks:
    """Mask kinds the kernel honours. A backend without this constraint takes no mask."""

    kinds: frozenset[str]
    max_ndim: int = 4

    def reason(self, call: CallSignature) -> Optional[str]:
        if call.mask_kind == MASK_NONE:
            return None
        if call.mask_kind not in self.kinds:
            return f"cannot honour a {call.mask_kind} mask"
        shape = call.mask_shape or ()
        if len(shape) < 2 or len(shape) > self.max_ndim:
            return f"cannot take a {len(shape)}-D mask"
        target = (call.batch, call.heads_q, call.seq_q, call.seq_k)
        for have, want in zip(canonical_mask_shape(shape), target):
            if have not in (1, want):
                return f"mask shape {list(shape)} does not broadcast to {list(target)}"
        return None


@dataclasses.dataclass(frozen=True)
class NoMask:
    def reason(self, call: CallSignature) -> Optional[str]:
        if call.mask_kind == MASK_NONE:
            return None
        return f"takes no mask (the call has a {call.mask_kind} mask)"


@dataclasses.dataclass(frozen=True)
class KeyHeads:
    """Whether fewer key/value heads than query heads (GQA/MQA) are supported."""

    gqa: bool

    def reason(self, call: CallSignature) -> Optional[str]:
        if not call.is_gqa:
            return None
        if not self.gqa:
            return f"needs as many key heads as query heads ({call.heads_kv} vs {call.heads_q})"
        if call.heads_kv == 0 or call.heads_q % call.heads_kv:
            return f"query heads ({call.heads_q}) must be a multiple of key heads ({call.heads_kv})"
        return None


@dataclasses.dataclass(frozen=True)
class SequenceLengths:
    """Sequence-length window for queries and keys, and whether Nq may differ from Nk."""

    min_q: int = 1
    min_k: int = 1
    max_q: int = 1 << 62
    max_k: int = 1 << 62
    cross: bool = True

    def reason(self, call: CallSignature) -> Optional[str]:
        if not self.cross and call.is_cross_attention:
            return f"needs Nq == Nk (Nq={call.seq_q}, Nk={call.seq_k})"
        if not self.min_q <= call.seq_q <= self.max_q:
            return f"Nq={call.seq_q} outside {self.min_q}..{self.max_q}"
        if not self.min_k <= call.seq_k <= self.max_k:
            return f"Nk={call.seq_k} outside {self.min_k}..{self.max_k}"
        return None


@dataclasses.dataclass(frozen=True)
class MinTokens:
    """For sparse kernels: calls with fewer query or key tokens stay on dense kernels,
    which are as fast there and exact (few blocks leave little to skip)."""

    tokens: int

    def reason(self, call: CallSignature) -> Optional[str]:
        shortest = min(call.seq_q, call.seq_k)
        if shortest >= self.tokens:
            return None
        return f"{shortest} tokens: sparse attention serves calls from {self.tokens} tokens (shorter ones stay dense)"


@dataclasses.dataclass(frozen=True)
class KeyBlockPadding:
    """For kernels that let padded keys of a partial last key block into the softmax:
    refuse calls where those padded slots exceed `max_fraction` of the keys.

    Measured on the H200 with sageattention 1.0.6 (D=64): relative L1 0.29 at Nk=77,
    0.15 at Nk=200, 0.035 at Nk=1090, against 0.012 at Nk=128 or 1024.
    """

    block: int
    max_fraction: float

    def reason(self, call: CallSignature) -> Optional[str]:
        padded = -call.seq_k % self.block
        if padded <= self.max_fraction * call.seq_k:
            return None
        return (f"Nk={call.seq_k} leaves {padded} padded keys in its last {self.block}-key block, "
                f"which this kernel lets into the softmax (error grows as Nk shrinks)")


@dataclasses.dataclass(frozen=True)
class Exactness:
    """Quantized kernels refuse calls whose model asked for precision."""

    quantized: bool

    def reason(self, call: CallSignature) -> Optional[str]:
        if not self.quantized:
            return None
        if not call.low_precision_ok:
            return "quantized, and the model asked for low_precision_attention=False"
        if call.attn_precision == torch.float32:
            return "quantized, and the model asked for attn_precision=float32"
        return None


@dataclasses.dataclass(frozen=True)
class DefaultScale:
    """For kernels without a scale argument: only calls using 1/sqrt(D)."""

    def reason(self, call: CallSignature) -> Optional[str]:
        if not call.custom_scale:
            return None
        return "has no softmax-scale argument, and the call passes its own scale"


@dataclasses.dataclass(frozen=True)
class OnDevice:
    """Apply `constraint` only to calls on `device_type` (e.g. SDPA's flash kernel has
    different rules on CUDA and on the CPU)."""

    device_type: str
    constraint: Constraint

    def reason(self, call: CallSignature) -> Optional[str]:
        if call.device_type != self.device_type:
            return None
        return self.constraint.reason(call)


@dataclasses.dataclass(frozen=True)
class OnCapabilityMajor:
    """Apply `constraint` only on CUDA GPUs whose major compute capability is in `majors`."""

    majors: frozenset[int]
    constraint: Constraint

    def reason(self, call: CallSignature) -> Optional[str]:
        cc = call.compute_capability
        if cc is None or cc[0] not in self.majors:
            return None
        return self.constraint.reason(call)


def collect_reasons(constraints: tuple[Constraint, ...], call: CallSignature) -> list[str]:
    """Every reason the constraints give against the call, in declaration order."""
    reasons = []
    for constraint in constraints:
        why = constraint.reason(call)
        if why is not None:
            reasons.append(why)
    return reasons
