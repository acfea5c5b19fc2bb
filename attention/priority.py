"""`auto`: a priority list per device class, written as data.

Each entry names a backend and the call shapes it is preferred for. A call goes to the
first entry whose rule matches *and* whose backend can serve it; every list ends with
`sdpa`, which serves everything. Rules only ever narrow where a faster kernel is used:
a rule never sends a call to a kernel that the evidence shows slower than SDPA there.

Evidence:
- sm90 rows follow our H200 kernel table (benchmarks/results/h200/kernels.md: SDPA
  sub-backends, FA4 4.0.0b36, SageAttention 2.2.0 built on the device, sage 1.0.6,
  comfy-kitchen), timed as steady-state cost per call with the host path included,
  and the team's reference table for FA3 (shared/reference/h200-kernels-2026-11.md).
  Quantized kernels lose to SDPA (cuDNN) below ~8k tokens (0.13-0.86x) and win at
  video lengths (1.28-1.42x at 32k-119k); FA4 wins 1.04-1.25x at head dim 128 from
  4.6k tokens and 1.10x at SD1.5's head dim 40 with 4096 tokens, but loses at head
  dim 64 (0.94x at SDXL's 4096 tokens) and on every short call, where its host path
  (72-75 µs a call) costs more than SDPA's whole call; 77-key cross-attention stays
  on SDPA.
- Other classes are *not measured here*: they follow the kernels' own published
  guidance (SageAttention's per-architecture choice; no Triton Sage on sm80/86, where
  it has produced black images) and use the same conservative length thresholds. The
  README marks them as such; `auto_tuned` (issue 6) replaces guesses with measurements.

Override: set ATTENTION_BACKENDS_AUTO to a JSON file with the same structure as
`AUTO_TABLE` (device class -> list of entries). It is read once per change of the file;
a file that cannot be used is named in one warning and the built-in table serves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from typing import Any, Optional

from .call import CallSignature
from .cost_model import (HOST_BOUND_MARGIN, QUANTIZED_MIN_KEYS, SAFEST, CostModel, allowed_by_accuracy, auto_order,
                         contested)
from .registry import get

log = logging.getLogger(__name__)

ENV_TABLE = "ATTENTION_BACKENDS_AUTO"

# Below this many query and key tokens no quantized kernel paid off on the H200.
VIDEO_TOKENS = 16384
# From here FA4/FA3 at head dim 128 beat cuDNN SDPA on the H200 (Flux 1024² has 4608).
LONG_TOKENS = 4096
# FA4 beats SDPA at these head dims from LONG_TOKENS (40: SD1.5's first level).
_FA4_DIMS = frozenset({40, 128})


@dataclasses.dataclass(frozen=True)
class Rule:
    """When an auto entry applies. Unset fields do not restrict."""

    min_tokens: int = 0  # both Nq and Nk at least this
    head_dims: Optional[frozenset[int]] = None
    # Set on a cost model's entry for a kernel it passes over: why (the walk records it and
    # moves on, so the report says why that kernel did not run).
    passed_over: Optional[str] = None

    def reason(self, call: CallSignature) -> Optional[str]:
        if self.passed_over is not None:
            return self.passed_over
        if self.head_dims is not None and call.head_dim not in self.head_dims:
            return f"auto uses it for head dims {sorted(self.head_dims)} only"
        if min(call.seq_q, call.seq_k) < self.min_tokens:
            return f"auto uses it from {self.min_tokens} query and key tokens"
        return None

    def to_json(self) -> dict:
        data: dict = {}
        if self.min_tokens:
            data["min_tokens"] = self.min_tokens
        if self.head_dims is not None:
            data["head_dims"] = sorted(self.head_dims)
        return data


@dataclasses.dataclass(frozen=True)
class AutoEntry:
    backend: str
    rule: Rule = Rule()
    evidence: str = ""
    # One of the kernels a cost model cannot separate on this call (cost_model.contested):
    # the dispatcher times them once, with SDPA as the reference, before walking the order.
    measure: bool = False


_D128 = frozenset({128})
_ALWAYS = Rule()

AUTO_TABLE: dict[str, tuple[AutoEntry, ...]] = {
    # Hopper (H100/H200), measured.
    "sm90": (
        AutoEntry("sage_qk_int8_pv_fp8_cuda_sm90", Rule(VIDEO_TOKENS, _D128),
                  "measured: 1.28-1.42x at Wan 480p/720p and HunyuanVideo 720p"),
        AutoEntry("flash4", Rule(LONG_TOKENS, _FA4_DIMS),
                  "measured: 1.04-1.25x at head dim 128 from Flux 1024² up; 1.10x at SD1.5 level 1 (D=40)"),
        AutoEntry("flash3", Rule(LONG_TOKENS, _D128), "measured: 1.04-1.20x from Flux 1024² up"),
        AutoEntry("sdpa", _ALWAYS, "measured: fastest below 4k tokens and at head dims other than 128"),
    ),
    # Blackwell data centre (B200) and consumer (RTX 50): not measured here.
    "sm100": (
        AutoEntry("flash4", Rule(LONG_TOKENS, _D128), "assumed: FA4 targets Blackwell first"),
        AutoEntry("sdpa", _ALWAYS),
    ),
    "sm120": (
        AutoEntry("sage_qk_int8_pv_fp8_cuda", Rule(VIDEO_TOKENS, _D128), "assumed: SageAttention's sm120 choice"),
        AutoEntry("sdpa", _ALWAYS),
    ),
    # Ada (RTX 40, L4, L40): not measured here.
    "sm89": (
        AutoEntry("sage_qk_int8_pv_fp8_cuda", Rule(VIDEO_TOKENS, _D128), "assumed: SageAttention's sm89 choice"),
        AutoEntry("sdpa", _ALWAYS),
    ),
    # Ampere (A100, RTX 30): not measured here; no Triton Sage (black images reported).
    "sm80": (
        AutoEntry("sage_qk_int8_pv_fp16_cuda", Rule(VIDEO_TOKENS, _D128), "assumed: SageAttention's sm80 choice"),
        AutoEntry("sdpa", _ALWAYS),
    ),
    # Older GPUs, CPUs and everything else: PyTorch's own choice.
    "default": (AutoEntry("sdpa", _ALWAYS),),
}


def device_class(device_type: str, capability: Optional[tuple[int, int]]) -> str:
    """The AUTO_TABLE row for a device."""
    if device_type != "cuda" or capability is None:
        return "default"
    major, minor = capability
    if major == 9:
        return "sm90"
    if major in (10, 11):
        return "sm100"
    if major >= 12:
        return "sm120"
    if (major, minor) >= (8, 9):
        return "sm89"
    if major == 8:
        return "sm80"
    return "default"


class InvalidAutoTable(ValueError):
    """An auto table file that cannot be used, and why."""


def _entry_from_json(device: str, row: Any) -> AutoEntry:
    where = f"{device!r} entry {row!r}"
    if not isinstance(row, dict) or not isinstance(row.get("backend"), str):
        raise InvalidAutoTable(f"{where} is not an object with a \"backend\" name")
    try:
        backend = get(row["backend"])
    except ValueError as error:  # an unknown name, with suggestions
        raise InvalidAutoTable(str(error)) from None
    if backend.sparse:
        raise InvalidAutoTable(f"{row['backend']!r} is a sparse backend: auto never chooses one (name it on the "
                               f"Attention Backend (Sparse) node instead)")
    min_tokens = row.get("min_tokens", 0)
    head_dims = row.get("head_dims")
    if not isinstance(min_tokens, int) or isinstance(min_tokens, bool) or min_tokens < 0:
        raise InvalidAutoTable(f"{where}: min_tokens must be a whole number >= 0")
    if head_dims is not None and not (isinstance(head_dims, list) and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in head_dims)):
        raise InvalidAutoTable(f"{where}: head_dims must be a list of positive whole numbers")
    evidence = row.get("evidence", "user override")
    return AutoEntry(row["backend"], Rule(min_tokens, frozenset(head_dims) if head_dims else None),
                     evidence if isinstance(evidence, str) else "user override")


def _entries_from_json(data: Any) -> dict[str, tuple[AutoEntry, ...]]:
    if not isinstance(data, dict):
        raise InvalidAutoTable("the top level must be an object: device class -> list of entries")
    table: dict[str, tuple[AutoEntry, ...]] = {}
    for device, rows in data.items():
        if not isinstance(rows, list):
            raise InvalidAutoTable(f"the entries of {device!r} must be a list")
        entries = [_entry_from_json(device, row) for row in rows]
        if not entries or entries[-1].backend != "sdpa" or entries[-1].rule != _ALWAYS:
            entries.append(AutoEntry("sdpa", _ALWAYS))
        table[device] = tuple(entries)
    return table


def read_table(path: str) -> dict[str, tuple[AutoEntry, ...]]:
    """AUTO_TABLE with the device classes of the JSON file `path` replaced; raises OSError
    or InvalidAutoTable."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        override = _entries_from_json(json.loads(raw.decode("utf-8-sig")))
    except UnicodeDecodeError as error:
        raise InvalidAutoTable(f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except RecursionError:
        raise InvalidAutoTable("JSON nested too deeply") from None
    except InvalidAutoTable:
        raise
    except ValueError as error:
        raise InvalidAutoTable(f"not JSON ({error})") from None
    return {**AUTO_TABLE, **override}


# The table last loaded from ATTENTION_BACKENDS_AUTO: (path, its mtime and size) -> table.
# Every node execution and status request asks for the table; the file is read again
# only when it changes, and a bad file is warned about once per change.
_loaded: dict[str, Any] = {"key": None, "table": None}
_loaded_lock = threading.Lock()


def load_table(path: Optional[str] = None) -> dict[str, tuple[AutoEntry, ...]]:
    """AUTO_TABLE, with device classes replaced from the file ATTENTION_BACKENDS_AUTO
    (or `path`) names. A file that cannot be used leaves AUTO_TABLE, with one warning."""
    path = path or os.environ.get(ENV_TABLE)
    if not path:
        return dict(AUTO_TABLE)
    try:
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size)
    except OSError:
        key = (path, None, None)
    with _loaded_lock:
        if _loaded["key"] != key:
            _loaded["key"], _loaded["table"] = key, _load(path)
        return dict(_loaded["table"])


def _load(path: str) -> dict[str, tuple[AutoEntry, ...]]:
    try:
        table = read_table(path)
    except (OSError, InvalidAutoTable) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        log.warning("attention backends: %s=%s cannot be used (%s); auto uses its built-in table. Fix the file "
                    "or unset %s.", ENV_TABLE, path, reason, ENV_TABLE)
        return dict(AUTO_TABLE)
    log.info("attention backends: auto table from %s (%s=%s)", path, ENV_TABLE, path)
    return table


def forget_loaded_table() -> None:
    """Read the file again on the next `load_table` (tests)."""
    with _loaded_lock:
        _loaded["key"] = _loaded["table"] = None


def auto_entries(device_type: str, capability: Optional[tuple[int, int]],
                 table: Optional[dict[str, tuple[AutoEntry, ...]]] = None) -> tuple[AutoEntry, ...]:
    table = table if table is not None else load_table()
    return table.get(device_class(device_type, capability), table["default"])


def model_candidates(call: CallSignature, model: CostModel) -> tuple[dict[str, float], frozenset[str], list[str]]:
    """The kernels a cost model may send `call` to here, with their predicted µs; those of
    them whose adapter copies q/k/v; and the quantized kernels left out for accuracy."""
    names, copying, too_short = [], set(), []
    for name in model.kernels:
        backend = get(name)
        if not backend.availability().available or backend.call_reasons(call):
            continue
        if not allowed_by_accuracy(name, backend.quantized, call):
            too_short.append(name)
            continue
        names.append(name)
        if backend.contiguous:
            copying.add(name)
    return model.predictions(call, names, frozenset(copying)), frozenset(copying), too_short


def model_entries(call: CallSignature, model: CostModel) -> tuple[AutoEntry, ...]:
    """`auto`'s order for one call from a cost model: the kernels that can serve it here,
    by predicted time, none predicted slower than SDPA (cost_model.auto_order). The kernels
    it passes over (predicted no faster than SDPA by the margin, or quantized on a short
    call) come just before SDPA as entries that say why, so the report lists them. The
    kernels it cannot separate (cost_model.contested) are marked `measure`."""
    predicted, copying, too_short = model_candidates(call, model)
    passed = [AutoEntry(name, Rule(passed_over=(
        f"auto's cost model uses quantized kernels from {QUANTIZED_MIN_KEYS} query and key tokens "
        "(their error on shorter calls was outside auto_tuned's budget)"))) for name in too_short]
    base = predicted.get(SAFEST)
    margins = model.margins(call, predicted, copying)
    order = auto_order(predicted, margins)
    measured = frozenset(contested(predicted, order))
    entries = [AutoEntry(name, _ALWAYS, f"{model.source} cost model: {predicted[name]:.1f} µs predicted"
                         + (f", SDPA {base:.1f} µs" if base is not None and name != SAFEST else ""),
                         measure=name in measured)
               for name in order]
    if base is not None:
        passed += [AutoEntry(name, Rule(passed_over=(
            f"{model.source} cost model: {predicted[name]:.1f} µs predicted, SDPA {base:.1f} µs (auto leaves "
            f"SDPA only for a predicted gain over {margins[name]:.0%}"
            f"{' when the host path decides' if margins[name] == HOST_BOUND_MARGIN else ''})")),
            measure=name in measured)
            for name in sorted(predicted, key=predicted.get) if name not in order]
    return tuple(entries[:-1] + passed + entries[-1:])


def auto_entries_for(call: CallSignature, table: dict[str, tuple[AutoEntry, ...]], model: Optional[CostModel],
                     saved: Optional[str] = None) -> tuple[AutoEntry, ...]:
    """`auto`'s order for one call: `auto_tuned`'s saved decision for it first (measured on
    this machine), then the cost model's order when there is a model, else the table's."""
    entries = auto_entries(call.device_type, call.compute_capability, table) if model is None else model_entries(
        call, model)
    if saved is None:
        return entries
    return (AutoEntry(saved, _ALWAYS, "auto_tuned's decision, measured on this machine"),) + tuple(
        e for e in entries if e.backend != saved)
