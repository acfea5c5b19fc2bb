"""Predicted time of one attention call per kernel: a small physical model per GPU class.

Why a model and not rules: which kernel wins depends on how long the call is, not on a
head-dim list. A kernel with a long host path (FlashAttention-4's CuTe DSL launch) loses
every short call and can win long ones; quantized kernels pay extra passes over Q/K/V that
only long calls amortise. A model with each kernel's fixed host cost and its GPU time as
a function of the work predicts calls it has never seen; the rule table cannot. The
measured figures behind it are in benchmarks/results/h200/ (cost_model/ for the grid,
the fit and its residuals, and the offline evaluation of the decisions it makes).

The steady-state cost of a call in a stream of calls (what `measure.py` measures and a
model pays) is the larger of the host's path and the GPU's time:

    t = max(host, gpu)
    host = host_us, times flat_host_factor when the call comes in ComfyUI's (B, N, H·D)
           form (the adapter's views and the output's reshape run on the host)
    gpu = launch + waves · tile + compute · mask_factor? · ragged_factor? + bytes / bandwidth
    compute = padded score elements · ((2·(Dq + Dv) / matmul_rate)^p + (1 / softmax_rate)^p)^(1/p)

"Padded" is the tiling: a kernel computes whole tiles of `block_q` queries by `block_k`
keys, with the head dim rounded up to its template (a multiple of `dim_quantum`, or the
next power of two from `dim_quantum` for kernels compiled for power-of-two head dims
only), and the tiles run in waves of one per SM; a call of 1.1 waves costs two. The
softmax term is why small head dims run at a lower TFLOP/s: the exponentials grow with
Nq·Nk, not D; p says how far a kernel overlaps the two (p = 1: they add; large p: the
slower one decides). "Ragged" calls have a key count that is not a whole number of
tiles: some kernels take a slower bounds-checked path in every query tile's key loop
then, which padding alone does not explain. `tile` is what each wave of query tiles pays
whatever the key count: loading its Q tile, the pipeline's fill and drain, the softmax's
final rescale and the O tile's store. It decides calls with many queries and few keys
(a video's cross-attention to its prompt: Wan 2.1 1.3B's 32760 queries over 512 keys
read FlashAttention-4 at 0.80x SDPA in benchmarks/results/h200/heldout/run2/, where the
model without the term predicted it 3% faster).

Ten numbers per kernel (host, flat-form host factor, launch, per-wave tile cost, matmul
rate, softmax rate, overlap, bandwidth, mask factor, ragged factor) and a tiling are
fitted to a measured grid (`attention.cost_fit`), and the grid's residuals, smoothed,
correct the GPU time where the form misses (`attention.cost_residuals`). Prediction is
pure Python arithmetic on a CallSignature: no torch ops, no allocation; `auto` calls it
once per call signature, never per call.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterable, Mapping, Optional, Union

from .call import FLAT, MASK_NONE, CallSignature, canonical_mask_shape
from .cost_residuals import InvalidCorrection, ResidualCorrection
from .cost_residuals import parse as parse_correction
from .json_values import finite_number

FORMAT = "comfyui-attention-backends/cost-model"
VERSION = 3
# Files of version 2 have no per-wave tile cost: read as 0, which is what they predicted.
_READABLE_VERSIONS = (2, VERSION)
# The kernel measured safest: every ComfyUI install runs it, and `auto` never predicts
# slower than it (see `auto_order`).
SAFEST = "sdpa"
# A kernel must be predicted this much faster than SDPA to take a call from it: smaller
# predicted gains are noise. How much is noise depends on the call's length. On the H200
# grid (cost_model/cost_grid.json), SDPA timed twice in the same rounds differed by a
# median 1.5% and a p90 of 10% on calls under 100 µs, where host paths decide, and by a
# median 0.6% and a p90 of 1.7% on calls from LONG_MARGIN_FROM_US up, where the GPU does:
# DEFAULT_MARGIN for the short calls, DEFAULT_LONG_MARGIN from there (by SDPA's predicted
# time).
DEFAULT_MARGIN = 0.03
DEFAULT_LONG_MARGIN = 0.01
LONG_MARGIN_FROM_US = 300.0
# A kernel predicted host-bound on a call (its host path longer than its GPU time) needs
# this much more: its time is then the speed of the user's CPU and Python, which no GPU
# fit knows. On one H200 type, FlashAttention-4 read 1.10x SDPA at SD1.5's level 1 in one
# run (kernels.json) and 0.76x in another (heldout/run2/heldout.md), the machines' hosts
# apart.
HOST_BOUND_MARGIN = 0.15
# Quantized kernels only where their error was measured inside auto_tuned's budget on the
# H200: from this many keys (short cross-attention with FP8 P·V was outside it,
# benchmarks/results/h200/kernels.md). The model speaks for speed, not for accuracy.
QUANTIZED_MIN_KEYS = 1024
# Kernels predicted within CONTESTED_WITHIN of the best on a call are ones the model cannot
# separate: its leave-one-out error of a quantized/exact time ratio, at the p90, on grid
# calls from 8192 tokens (cost_model/residuals.md; a test ties the two). Every held-out miss
# of the model alone was such a pair (FA4 and Sage 2 fp8 at head dim 128, 18-33k tokens,
# 1.5-6.7% apart, the winner changing between machines), and every table miss too (FA4 and
# SDPA at SD1.5's level 1 and Flux 1024², 150-430 µs, which the host's speed decides).
# `auto` times those kernels once per call signature and machine, on calls whose SDPA is
# predicted at CONTESTED_FROM_US or more: the grid's boundary between calls the host path
# decides (SDPA timed twice read a p90 of 10% apart under 100 µs, see DEFAULT_MARGIN: a
# measurement there is mostly noise) and calls the GPU does. A measurement cost 0.12-0.36 s
# on image calls and 0.35-1.8 s on video ones, once per machine (heldout/run12 and run13,
# contested_tuning_ms).
CONTESTED_WITHIN = 0.091
CONTESTED_FROM_US = 100.0

_PARAMS = ("host_us", "flat_host_factor", "launch_us", "tile_us", "tflops", "softmax_gelems", "overlap", "gbps",
           "mask_factor", "ragged_factor")
_TILING_FIELDS = ("block_q", "block_k", "dim_quantum", "dim_pow2")


def _ceil_to(value: int, quantum: int) -> int:
    return -(-value // quantum) * quantum


def _next_pow2(value: int, floor: int) -> int:
    return max(floor, 1 << max(0, value - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Work:
    """What the model reads of a call: sizes, element size, mask size, whether the call
    comes in ComfyUI's flat (B, N, H·D) form, and whether the kernel's adapter copies
    q/k/v (a strided view handed to a kernel that needs contiguous memory)."""

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
    flat: bool = False

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
                call.dtype.itemsize, mask_elements, copies, call.layout_in == FLAT)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a kernel cuts the work: query and key tile sizes, and its head-dim templates
    (multiples of `dim_quantum`, or powers of two from `dim_quantum` when `dim_pow2`)."""

    block_q: int
    block_k: int
    dim_quantum: int
    dim_pow2: bool = False

    def waves(self, work: Work, sms: int) -> int:
        """Waves of query tiles, one tile per SM at a time: a call of 1.1 waves runs two."""
        tiles = work.batch * work.heads_q * -(-work.seq_q // self.block_q)
        return -(-tiles // sms)

    def padded_elements(self, work: Work, sms: int) -> float:
        """Score elements the kernel computes, counting whole tiles and whole waves."""
        return float(self.waves(work, sms) * sms * self.block_q * _ceil_to(work.seq_k, self.block_k))

    def padded_dim(self, dim: int) -> int:
        return _next_pow2(dim, self.dim_quantum) if self.dim_pow2 else _ceil_to(dim, self.dim_quantum)

    def padded_dims(self, work: Work) -> int:
        return self.padded_dim(work.head_dim) + self.padded_dim(work.head_dim_v)

    def ragged(self, work: Work) -> bool:
        """Whether the keys end inside a tile: then every query tile's key loop has a
        partial block (a query count that ends inside a tile costs one partial tile, which
        the padding counts)."""
        return bool(work.seq_k % self.block_k)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """One kernel's fitted cost on one GPU class.

    host_us: the host's path per call (Python, argument checks, launches) for a call in
        (B, H, N, D) form; a stream of calls cannot go faster than this whatever the GPU does.
    flat_host_factor: the host path's multiplier for a call in ComfyUI's (B, N, H·D) form.
    launch_us: GPU time of the smallest call (launch latency, extra passes' floors).
    tile_us: GPU time each wave of query tiles pays whatever the key count (Q tile load,
        pipeline fill and drain, final rescale, O tile store).
    tflops: matrix-multiply rate; softmax_gelems: score elements per second (10⁹) for the
        exponentials and rescaling; gbps: bytes per second (10⁹) for Q/K/V/O and the mask.
    overlap: how far the matrix multiplies and the softmax run at once: per score element
        the two times combine as (mm^p + softmax^p)^(1/p) with p = 1 + overlap, so near 0
        they add (one after the other) and large values leave the slower one (kernels that
        ping-pong warp groups hide the softmax under the next tile's multiplies).
    mask_factor: compute multiplier on masked calls (the masked code path is slower).
    ragged_factor: compute multiplier on calls whose key count ends inside a tile.
    """

    host_us: float
    flat_host_factor: float
    launch_us: float
    tile_us: float
    tflops: float
    softmax_gelems: float
    overlap: float
    gbps: float
    mask_factor: float
    ragged_factor: float
    tiling: Tiling

    def host(self, work: Work) -> float:
        return self.host_us * (self.flat_host_factor if work.flat else 1.0)

    def gpu_us(self, work: Work, sms: int) -> float:
        elements = self.tiling.padded_elements(work, sms)
        p = 1.0 + self.overlap
        matmul_ps = 2.0 * self.tiling.padded_dims(work) / self.tflops
        softmax_ps = 1e3 / self.softmax_gelems
        slower = max(matmul_ps, softmax_ps)  # scaled by the slower term, no power overflows
        per_element_s = slower * ((matmul_ps / slower) ** p + (softmax_ps / slower) ** p) ** (1.0 / p) * 1e-12
        compute_s = elements * per_element_s * (self.mask_factor if work.masked else 1.0) * (
            self.ragged_factor if self.tiling.ragged(work) else 1.0)
        return (self.launch_us + self.tiling.waves(work, sms) * self.tile_us
                + (compute_s + work.bytes_moved / (self.gbps * 1e9)) * 1e6)

    def predict_us(self, work: Work, sms: int) -> float:
        """Steady-state microseconds per call in a stream of such calls."""
        return max(self.host(work), self.gpu_us(work, sms))

    def to_json(self) -> dict:
        data = {name: getattr(self, name) for name in _PARAMS}
        data["tiling"] = self.tiling.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "KernelCost":
        return cls(**{name: float(data.get(name, 0.0)) for name in _PARAMS}, tiling=Tiling(**data["tiling"]))


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
    long_margin: float = DEFAULT_LONG_MARGIN
    correction: Optional[ResidualCorrection] = None  # the grid's smoothed residuals (cost_residuals.py)

    def margin_for(self, sdpa_us: float, host_bound: bool = False) -> float:
        """The predicted gain over SDPA a kernel needs to take a call SDPA is predicted to
        run in `sdpa_us` (see DEFAULT_MARGIN and HOST_BOUND_MARGIN)."""
        if host_bound:
            return HOST_BOUND_MARGIN
        return self.long_margin if sdpa_us >= LONG_MARGIN_FROM_US else self.margin

    def host_bound(self, name: str, call: CallSignature, copies: bool = False) -> bool:
        """Whether kernel `name`'s predicted time on the call is its host path."""
        cost, work = self.kernels[name], work_of(call, copies)
        return cost.host(work) >= cost.gpu_us(work, self.sms)

    def margins(self, call: CallSignature, predicted: Mapping[str, float],
                copying: frozenset[str] = frozenset()) -> dict[str, float]:
        """Each predicted kernel's margin over SDPA on this call (margin_for)."""
        base = predicted.get(SAFEST, 0.0)
        return {name: self.margin_for(base, self.host_bound(name, call, name in copying)) for name in predicted}

    def gpu_us(self, name: str, work: Work) -> float:
        """Kernel `name`'s GPU time on a call, the grid's residual correction applied."""
        gpu = self.kernels[name].gpu_us(work, self.sms)
        return gpu if self.correction is None else gpu * self.correction.factor(name, work)

    def _predict(self, name: str, work: Work) -> float:
        # A host-bound call's time is the host path, which the form models directly: the
        # correction (learnt on GPU-bound calls only) is not asked.
        cost = self.kernels[name]
        host = cost.host(work)
        if cost.gpu_us(work, self.sms) <= host:
            return host
        return max(host, self.gpu_us(name, work))

    def predict_us(self, name: str, call: CallSignature, copies: bool = False) -> Optional[float]:
        """Predicted µs per call of kernel `name`; None for a kernel the model has not fitted."""
        return self._predict(name, work_of(call, copies)) if name in self.kernels else None

    def predictions(self, call: CallSignature, names: Iterable[str],
                    copying: frozenset[str] = frozenset()) -> dict[str, float]:
        """Predicted µs per call of each fitted kernel among `names`; `copying`: the kernels
        whose adapter copies q/k/v on this call's layout."""
        plain, copied = work_of(call), work_of(call, copies=True)
        return {name: self._predict(name, copied if name in copying else plain)
                for name in names if name in self.kernels}

    def to_json(self) -> dict:
        data = {"format": FORMAT, "version": VERSION, "gpu_class": self.gpu_class, "gpu": self.gpu, "sms": self.sms,
                "margin": self.margin, "long_margin": self.long_margin,
                "kernels": {n: k.to_json() for n, k in sorted(self.kernels.items())}, "fit": dict(self.fit)}
        if self.correction is not None:
            data["correction"] = self.correction.to_json()
        return data


def auto_order(predicted: Mapping[str, float], margin: Union[float, Mapping[str, float]],
               safest: str = SAFEST) -> list[str]:
    """The kernels `auto` tries for a call, best first, from their predicted times.

    Only kernels predicted faster than `safest` by more than `margin` (one for all, or per
    kernel) come before it, and
    nothing comes after it: `auto` is never predicted slower than SDPA, by construction.
    A kernel within the margin of SDPA leaves the call on SDPA (a noise-level gain is not
    worth moving off the kernel measured safest). Ties break by name, so the order is
    deterministic.
    """
    if safest not in predicted:
        return [safest]
    margins = margin if isinstance(margin, Mapping) else dict.fromkeys(predicted, margin)
    faster = sorted((t, name) for name, t in predicted.items()
                    if name != safest and t < predicted[safest] / (1.0 + margins[name]))
    return [name for _, name in faster] + [safest]


def contested(predicted: Mapping[str, float], order: list[str], within: float = CONTESTED_WITHIN,
              from_us: float = CONTESTED_FROM_US, safest: str = SAFEST) -> list[str]:
    """The kernels of `predicted` within `within` of the best kernel of `order` (auto's
    order from `auto_order`), fastest predicted first, when SDPA is predicted at `from_us`
    or more and there are at least two; else none."""
    if predicted.get(safest, 0.0) < from_us or not order:
        return []
    limit = predicted[order[0]] * (1.0 + within)
    leaders = sorted((t, name) for name, t in predicted.items() if t <= limit)
    return [name for _, name in leaders] if len(leaders) > 1 else []


def allowed_by_accuracy(name: str, quantized: bool, call: CallSignature) -> bool:
    """Whether the model may send `call` to a kernel, accuracy-wise (see QUANTIZED_MIN_KEYS)."""
    return not quantized or min(call.seq_q, call.seq_k) >= QUANTIZED_MIN_KEYS


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise InvalidCostModel(what)


def _positive(value: Any, what: str) -> float:
    _check(finite_number(value) and value > 0, f"{what} is not a positive finite number")
    return float(value)


def _fraction(value: Any, what: str) -> float:
    _check(finite_number(value) and 0 <= value < 1, f"{what} is not a fraction in [0, 1)")
    return float(value)


def _non_negative(value: Any, what: str) -> float:
    _check(finite_number(value) and value >= 0, f"{what} is not a finite number >= 0")
    return float(value)


def parse(data: Any, known_kernels: Iterable[str], source: str = "default") -> CostModel:
    """A cost model from its JSON form, checked field by field; raises InvalidCostModel
    with the first problem."""
    known = set(known_kernels)
    _check(isinstance(data, dict), "the top level is not an object")
    _check(data.get("format") == FORMAT, f"format is {data.get('format')!r}, not {FORMAT!r}")
    version = data.get("version")
    _check(version in _READABLE_VERSIONS, f"version is {version!r}, not one of {_READABLE_VERSIONS}")
    _check(isinstance(data.get("gpu_class"), str), "gpu_class is not a string")
    _check(isinstance(data.get("gpu"), str), "gpu is not a string")
    sms = data.get("sms")
    _check(isinstance(sms, int) and not isinstance(sms, bool) and 0 < sms < 10_000, "sms is not a count of SMs")
    margin = _fraction(data.get("margin", DEFAULT_MARGIN), "margin")
    long_margin = _fraction(data.get("long_margin", margin if version == 2 else DEFAULT_LONG_MARGIN), "long_margin")
    kernels_data = data.get("kernels")
    _check(isinstance(kernels_data, dict) and kernels_data, "kernels is not a non-empty object")
    _check(SAFEST in kernels_data, f"the model has no {SAFEST!r} entry, which auto needs to compare against")
    kernels = {}
    for name, entry in kernels_data.items():
        _check(name in known, f"kernel {name!r} is not a backend of this pack")
        _check(isinstance(entry, dict), f"entry of {name} is not an object")
        for param in _PARAMS:
            if param == "tile_us":
                _non_negative(entry.get(param, 0.0 if version == 2 else None), f"{param} of {name}")
            else:
                _positive(entry.get(param), f"{param} of {name}")
        tiling = entry.get("tiling")
        _check(isinstance(tiling, dict) and set(tiling) == set(_TILING_FIELDS),
               f"tiling of {name} is not {{{', '.join(_TILING_FIELDS)}}}")
        for field in _TILING_FIELDS[:3]:
            value = tiling[field]
            _check(isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 4096,
                   f"tiling {field} of {name} is not a positive integer")
        _check(isinstance(tiling["dim_pow2"], bool), f"tiling dim_pow2 of {name} is not true or false")
        kernels[name] = KernelCost.from_json(entry)
    fit = data.get("fit", {})
    _check(isinstance(fit, dict), "fit is not an object")
    correction = None
    if data.get("correction") is not None:
        try:
            correction = parse_correction(data["correction"], kernels)
        except InvalidCorrection as error:
            raise InvalidCostModel(str(error)) from None
    return CostModel(gpu_class=data["gpu_class"], gpu=data["gpu"], sms=sms, kernels=kernels, margin=margin,
                     source=source, fit=fit, long_margin=long_margin, correction=correction)


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
