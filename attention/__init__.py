"""ComfyUI Attention Backends: the backend library.

Pure PyTorch; never imports ComfyUI. The node pack (`nodes/`) plugs this into
ComfyUI's attention override; `python -m attention doctor|bench` uses it standalone.

    from attention import Dispatcher
    attend = Dispatcher("auto")                # or "auto_tuned", or "flash4 > sage > sdpa"
    out = attend(q, k, v, heads, mask)         # ComfyUI's call forms, see attention.call
"""

from __future__ import annotations

from .backend import Availability, Backend, Package
from .call import FLAT, HEADS_FIRST, CallSignature, describe_call
from .counters import UsageCounters
from .dispatch import PASSTHROUGH, Dispatcher, Plan, forget_failures
from .errors import NoBackendError, Rejection
from .priority import AUTO_TABLE, auto_entries, device_class
from .priority_list import (
    AutoStrategy, NamedBackend, Priority, PriorityEntry, PriorityError, TunedStrategy, parse_priority,
)
from .registry import AUTO, AUTO_TUNED, UnknownBackendError, all_backends, get, names, sparse_names

__all__ = [
    "AUTO", "AUTO_TABLE", "AUTO_TUNED", "AutoStrategy", "Availability", "Backend", "CallSignature", "Dispatcher",
    "FLAT", "HEADS_FIRST", "NamedBackend", "NoBackendError", "PASSTHROUGH", "Package", "Plan", "Priority",
    "PriorityEntry", "PriorityError", "Rejection", "TunedStrategy", "UnknownBackendError", "UsageCounters",
    "all_backends", "auto_entries", "describe_call", "device_class", "forget_failures", "get", "names",
    "parse_priority", "sparse_names",
]
