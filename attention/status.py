"""What this machine can run: every backend with its availability, and the `auto` order
with its choice for typical model shapes on each visible device. Shared by
`python -m attention doctor` and the `/attention_backends/status` route."""

from __future__ import annotations

from typing import Optional

import torch

from . import cost_store, registry
from .cost_model import CostModel
from .dispatch import Dispatcher
from .parallel.status import parallel_status
from .priority import auto_entries, device_class
from .shapes import MODEL_SHAPES, ModelShape


def backend_rows() -> list[dict]:
    rows = []
    for backend, availability in registry.availability_table():
        rows.append({
            "name": backend.name,
            "family": backend.family,
            "description": backend.description,
            "quantized": backend.quantized,
            "sparse": backend.sparse,
            "available": availability.available,
            "version": availability.version,
            "reasons": list(availability.reasons),
            "install_hint": backend.package.hint() if backend.package else "",
            "copies": backend.copies,
        })
    return rows


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


def device_rows() -> list[dict]:
    """One row per visible CUDA device, or one for the CPU when there is none."""
    devices: list[tuple[str, str, Optional[tuple[int, int]], Optional[int]]] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            devices.append(("cuda", torch.cuda.get_device_name(index),
                            tuple(torch.cuda.get_device_capability(index)), index))
    else:
        devices.append(("cpu", "CPU", None, None))
    dispatcher = Dispatcher(registry.AUTO)
    rows = []
    for device_type, name, capability, index in devices:
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        order = []
        for entry in auto_entries(device_type, capability):
            availability = registry.get(entry.backend).availability()
            order.append({"backend": entry.backend, "rule": entry.rule.to_json(), "evidence": entry.evidence,
                          "available": availability.available, "reasons": list(availability.reasons)})
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


def machine_status() -> dict:
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "backends": backend_rows(),
        "devices": device_rows(),
        "parallel": parallel_status(),
    }
