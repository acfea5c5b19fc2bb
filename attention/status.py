"""What this machine can run: every backend with its availability, and the `auto` order
with its choice for typical model shapes on each visible device. Shared by
`python -m attention doctor` and the `/attention_backends/status` route."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import cost_store, registry
from .backend import Availability, Backend
from .contract import install_hint
from .cost_model import CostModel
from .dispatch import Dispatcher
from .parallel.status import parallel_status
from .priority import auto_entries, device_class
from .shapes import MODEL_SHAPES, ModelShape


# (type, name, compute capability, index) of a device the status describes.
Device = tuple[str, str, Optional[tuple[int, int]], Optional[int]]


def reasons_and_install(backend: Backend, availability: Availability) -> tuple[list[str], Optional[dict]]:
    """Why a backend is unavailable, and how to install its package when that would help.

    A reason that installing the package fixes ends with the package's hint
    (attention.backend): the hint becomes {command, note}, the reason keeps the rest.
    No install hint when installing would not help: the backend runs, or what is missing
    is a GPU, not a package.
    """
    suffix = f" ({backend.package.hint()})" if backend.package else None
    if suffix is None:
        return list(availability.reasons), None
    reasons = [r[:-len(suffix)] if r.endswith(suffix) else r for r in availability.reasons]
    package_problem = any(r.endswith(suffix) for r in availability.reasons)
    return reasons, install_hint(backend.package) if package_problem else None


def backend_row(backend: Backend, availability: Availability) -> dict:
    """One backend as the status shows it."""
    reasons, install = reasons_and_install(backend, availability)
    return {
        "name": backend.name,
        "family": backend.family,
        "description": backend.description,
        "quantized": backend.quantized,
        "sparse": backend.sparse,
        "available": availability.available,
        "version": availability.version,
        "reasons": reasons,
        "install": install,
        "copies": backend.copies,
    }


def backend_rows() -> list[dict]:
    return [backend_row(backend, availability) for backend, availability in registry.availability_table()]


def _typical_choice(dispatcher: Dispatcher, shape: ModelShape, device_type: str,
                    capability: Optional[tuple[int, int]], dtype: torch.dtype, model: Optional[CostModel]) -> dict:
    call = shape.signature(device_type, capability, dtype)
    plan = dispatcher.plan_for(call)
    # Every fitted kernel that could serve the call, installed here or not: what it would cost.
    servable = [name for name in (model.kernels if model else ()) if not registry.get(name).call_reasons(call)]
    predicted = model.predictions(call, servable) if model else {}
    return {"shape": shape.label, "key": shape.key, "backend": plan.name,
            "predicted_us": {name: round(us, 1) for name, us in sorted(predicted.items(), key=lambda x: x[1])},
            "passed_over": [{"backend": r.backend, "kind": r.kind, "reasons": list(r.reasons)}
                            for r in plan.rejected]}


def visible_devices() -> list[Device]:
    """Every visible CUDA device, or the CPU when there is none."""
    if not torch.cuda.is_available():
        return [("cpu", "CPU", None, None)]
    return [("cuda", torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)), index)
            for index in range(torch.cuda.device_count())]


def device_rows(devices: Optional[Sequence[Device]] = None) -> list[dict]:
    """One row per device (default: the visible ones): `auto`'s order there and its choice
    for typical model shapes."""
    devices = visible_devices() if devices is None else devices
    dispatcher = Dispatcher(registry.AUTO)
    rows = []
    for device_type, name, capability, index in devices:
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        order = []
        for entry in auto_entries(device_type, capability):
            backend = registry.get(entry.backend)
            availability = backend.availability()
            reasons, install = reasons_and_install(backend, availability)
            order.append({"backend": entry.backend, "rule": entry.rule.to_json(), "evidence": entry.evidence,
                          "available": availability.available, "reasons": reasons, "install": install})
        model = cost_store.model_for(device_type, capability)
        rows.append({
            "type": device_type, "index": index, "name": name,
            "capability": None if capability is None else "%d.%d" % capability,
            "class": device_class(device_type, capability),
            "auto_order": order,
            # "calibrated" (this GPU, `python -m attention calibrate`), "default" (the model
            # shipped for the class) or "rules" (the table above decides).
            "auto_source": cost_store.describe(device_type, capability),
            "typical": [_typical_choice(dispatcher, s, device_type, capability, dtype, model) for s in MODEL_SHAPES],
        })
    return rows


def machine_status(devices: Optional[Sequence[Device]] = None) -> dict:
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "backends": backend_rows(),
        "devices": device_rows(devices),
        "parallel": parallel_status(),
    }
