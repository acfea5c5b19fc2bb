"""Predicted time of one attention call per kernel: a small physical model per GPU class.

Why a model and not rules: which kernel wins depends on how long the call is, not on a
head-dim list. FlashAttention-4's host path costs ~72 µs a call on the H200, so it loses
every short call and wins long ones; quantized kernels pay extra passes over Q/K/V that
only long calls amortise. A model with each kernel's fixed host cost and its GPU time as
a function of the work predicts calls it has never seen; the rule table cannot.

The steady-state cost of a call in a stream of calls (what `measure.py` measures and a
model pays) is the larger of the host's path and the GPU's time:

    t = max(host, gpu)
    gpu = launch + mask_factor? · compute + bytes / bandwidth
    compute = padded score elements · (2·(Dq + Dv) / matmul_rate + 1 / softmax_rate)

"Padded" is the tiling: a kernel computes whole tiles of `block_q` queries by `block_k`
keys, with the head dim rounded up to its template (`dim_quantum`), and the tiles run in
waves of one per SM; a call of 1.1 waves costs two. The softmax term is why head dim 64
runs at ~0.73x the TFLOP/s of head dim 128: the exponentials grow with Nq·Nk, not D.

Six numbers per kernel (host, launch, matmul rate, softmax rate, bandwidth, mask factor)
and a tiling are fitted to a measured grid (`attention.cost_fit`). Prediction is pure
Python arithmetic on a CallSignature: no torch ops, no allocation; `auto` calls it once per
call signature, never per call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Iterable, Mapping, Optional

from .call import MASK_NONE, CallSignature, canonical_mask_shape

log = logging.getLogger(__name__)

FORMAT = "comfyui-attention-backends/cost-model"
VERSION = 1
# The kernel measured safest: every ComfyUI install runs it, and `auto` never predicts
# slower than it (see `auto_order`).
SAFEST = "sdpa"
# A kernel must be predicted this much faster than SDPA to take a call from it. Two timings
# of one kernel in the same rounds differ by 1-2% on short calls on the H200 (the noise
# floor columns of benchmarks/results/h200/), and the model's own error is larger than
# that on calls near a crossover, so smaller predicted gains are noise.
DEFAULT_MARGIN = 0.03
# Quantized kernels only where their error was measured inside auto_tuned's budget on the
# H200: from 1024 keys (SDXL's 77-key cross-attention was 0.026 rel. L1 with FP8 P·V,
# benchmarks/results/h200/kernels.md). The model speaks for speed, not for accuracy.
QUANTIZED_MIN_KEYS = 1024

_PARAMS = ("host_us", "launch_us", "tflops", "softmax_gelems", "gbps", "mask_factor")


def _ceil_to(value: int, quantum: int) -> int:
    return -(-value // quantum) * quantum


@dataclasses.dataclass(frozen=True)
class Work:
    """What the model reads of a call: sizes, element size, mask size, and whether the
    kernel's adapter copies q/k/v (a strided view handed to a kernel that needs contiguous
    memory)."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    head_dim_v: int
    element_bytes: int
    mask_elements: int = 0
    copies: bool = False

    @property
    def masked(self) -> bool:
        return self.mask_elements > 0

    @property
    def bytes_moved(self) -> float:
        """Q, K, V read and O written once; the mask read once; doubled for copies."""
        qo = self.batch * self.heads_q * self.seq_q * (self.head_dim + self.head_dim_v)
        kv = self.batch * self.heads_kv * self.seq_k * (self.head_dim + self.head_dim_v)
        tensors = (qo + kv) * self.element_bytes * (2 if self.copies else 1)
        return tensors + self.mask_elements * self.element_bytes


def work_of(call: CallSignature, copies: bool = False) -> Work:
    """The model's view of a call signature."""
    mask_elements = 0
    if call.mask_kind != MASK_NONE:
        shape = canonical_mask_shape(tuple(call.mask_shape or (1, 1, call.seq_q, call.seq_k)))
        mask_elements = max(1, math.prod(shape))
    return Work(call.batch, call.heads_q, call.heads_kv, call.seq_q, call.seq_k, call.head_dim, call.head_dim_v,
                call.dtype.itemsize, mask_elements, copies)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a kernel cuts the work: query and key tile sizes and head-dim template step."""

    block_q: int
    block_k: int
    dim_quantum: int

    def padded_elements(self, work: Work, sms: int) -> float:
        """Score elements the kernel computes, counting whole tiles and whole waves."""
        tiles = work.batch * work.heads_q * -(-work.seq_q // self.block_q)
        waves = -(-tiles // sms)
        return float(waves * sms * self.block_q * _ceil_to(work.seq_k, self.block_k))

    def padded_dims(self, work: Work) -> int:
        return _ceil_to(work.head_dim, self.dim_quantum) + _ceil_to(work.head_dim_v, self.dim_quantum)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """One kernel's fitted cost on one GPU class.

    host_us: the host's path per call (Python, argument checks, launches); a stream of
        calls cannot go faster than this whatever the GPU does.
    launch_us: GPU time of the smallest call (launch latency, extra passes' floors).
    tflops: matrix-multiply rate; softmax_gelems: score elements per second (10⁹) for the
        exponentials and rescaling; gbps: bytes per second (10⁹) for Q/K/V/O and the mask.
    mask_factor: compute multiplier on masked calls (the masked code path is slower).
    """

    host_us: float
    launch_us: float
    tflops: float
    softmax_gelems: float
    gbps: float
    mask_factor: float
    tiling: Tiling

    def gpu_us(self, work: Work, sms: int) -> float:
        elements = self.tiling.padded_elements(work, sms)
        per_element_s = 2.0 * self.tiling.padded_dims(work) / (self.tflops * 1e12) + 1.0 / (self.softmax_gelems * 1e9)
        compute_s = elements * per_element_s * (self.mask_factor if work.masked else 1.0)
        return self.launch_us + (compute_s + work.bytes_moved / (self.gbps * 1e9)) * 1e6

    def predict_us(self, work: Work, sms: int) -> float:
        """Steady-state microseconds per call in a stream of such calls."""
        return max(self.host_us, self.gpu_us(work, sms))

    def to_json(self) -> dict:
        data = {name: getattr(self, name) for name in _PARAMS}
        data["tiling"] = self.tiling.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "KernelCost":
        return cls(**{name: float(data[name]) for name in _PARAMS}, tiling=Tiling(**data["tiling"]))


class InvalidCostModel(ValueError):
    """A cost-model file this version of the pack did not write, or one damaged."""


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Every fitted kernel of one GPU class, and how `auto` decides from them."""

    gpu_class: str
    gpu: str
    sms: int
    kernels: Mapping[str, KernelCost]
    margin: float = DEFAULT_MARGIN
    source: str = "default"  # "default" (shipped with the pack) or "calibrated" (this machine)
    fit: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # per kernel: points, residuals

    def predict_us(self, name: str, call: CallSignature, copies: bool = False) -> Optional[float]:
        """Predicted µs per call of kernel `name`; None for a kernel the model has not fitted."""
        cost = self.kernels.get(name)
        return None if cost is None else cost.predict_us(work_of(call, copies), self.sms)

    def predictions(self, call: CallSignature, names: Iterable[str],
                    copying: frozenset[str] = frozenset()) -> dict[str, float]:
        """Predicted µs per call of each fitted kernel among `names`; `copying`: the kernels
        whose adapter copies q/k/v on this call's layout."""
        plain, copied = work_of(call), work_of(call, copies=True)
        return {name: self.kernels[name].predict_us(copied if name in copying else plain, self.sms)
                for name in names if name in self.kernels}

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "gpu_class": self.gpu_class, "gpu": self.gpu, "sms": self.sms,
                "margin": self.margin, "kernels": {n: k.to_json() for n, k in sorted(self.kernels.items())},
                "fit": dict(self.fit)}


def auto_order(predicted: Mapping[str, float], margin: float, safest: str = SAFEST) -> list[str]:
    """The kernels `auto` tries for a call, best first, from their predicted times.

    Only kernels predicted faster than `safest` by more than `margin` come before it, and
    nothing comes after it: `auto` is never predicted slower than SDPA, by construction.
    A kernel within the margin of SDPA leaves the call on SDPA (a noise-level gain is not
    worth moving off the kernel measured safest). Ties break by name, so the order is
    deterministic.
    """
    if safest not in predicted:
        return [safest]
    bar = predicted[safest] / (1.0 + margin)
    faster = sorted((t, name) for name, t in predicted.items() if name != safest and t < bar)
    return [name for _, name in faster] + [safest]


def allowed_by_accuracy(name: str, quantized: bool, call: CallSignature) -> bool:
    """Whether the model may send `call` to a kernel, accuracy-wise (see QUANTIZED_MIN_KEYS)."""
    return not quantized or min(call.seq_q, call.seq_k) >= QUANTIZED_MIN_KEYS


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise InvalidCostModel(what)


def _positive(value: Any, what: str) -> float:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
           f"{what} is not a positive finite number")
    return float(value)


def parse(data: Any, known_kernels: Iterable[str], source: str = "default") -> CostModel:
    """A cost model from its JSON form, checked field by field; raises InvalidCostModel
    with the first problem."""
    known = set(known_kernels)
    _check(isinstance(data, dict), "the top level is not an object")
    _check(data.get("format") == FORMAT, f"format is {data.get('format')!r}, not {FORMAT!r}")
    _check(data.get("version") == VERSION, f"version is {data.get('version')!r}, not {VERSION}")
    _check(isinstance(data.get("gpu_class"), str), "gpu_class is not a string")
    _check(isinstance(data.get("gpu"), str), "gpu is not a string")
    sms = data.get("sms")
    _check(isinstance(sms, int) and not isinstance(sms, bool) and 0 < sms < 10_000, "sms is not a count of SMs")
    margin = data.get("margin", DEFAULT_MARGIN)
    _check(isinstance(margin, (int, float)) and not isinstance(margin, bool) and 0 <= margin < 1,
           "margin is not a fraction in [0, 1)")
    kernels_data = data.get("kernels")
    _check(isinstance(kernels_data, dict) and kernels_data, "kernels is not a non-empty object")
    _check(SAFEST in kernels_data, f"the model has no {SAFEST!r} entry, which auto needs to compare against")
    kernels = {}
    for name, entry in kernels_data.items():
        _check(name in known, f"kernel {name!r} is not a backend of this pack")
        _check(isinstance(entry, dict), f"entry of {name} is not an object")
        for param in _PARAMS:
            _positive(entry.get(param), f"{param} of {name}")
        tiling = entry.get("tiling")
        _check(isinstance(tiling, dict) and set(tiling) == {"block_q", "block_k", "dim_quantum"},
               f"tiling of {name} is not {{block_q, block_k, dim_quantum}}")
        for field, value in tiling.items():
            _check(isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 4096,
                   f"tiling {field} of {name} is not a positive integer")
        kernels[name] = KernelCost.from_json(entry)
    fit = data.get("fit", {})
    _check(isinstance(fit, dict), "fit is not an object")
    return CostModel(gpu_class=data["gpu_class"], gpu=data["gpu"], sms=sms, kernels=kernels, margin=float(margin),
                     source=source, fit=fit)


def load(path: str, known_kernels: Iterable[str], source: str = "default") -> CostModel:
    """A cost-model file; raises InvalidCostModel (with the path) when it is not one."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except ValueError as error:
        raise InvalidCostModel(f"{path}: not JSON ({error})") from None
    try:
        return parse(data, known_kernels, source)
    except InvalidCostModel as error:
        raise InvalidCostModel(f"{path}: {error}") from None


def save(model: CostModel, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(model.to_json(), handle, indent=1, sort_keys=True)
        handle.write("\n")
