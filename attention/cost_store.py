"""Which cost model `auto` uses for a call: this machine's calibration, else the model
shipped for the GPU class (attention/cost_models/<class>.json), else none (the rule table).

Files are data: parsed and checked field by field (cost_model.parse); a damaged or
foreign file is ignored with a warning, never partly trusted. Answers are cached per
GPU class for the process; `forget()` drops them (tests, after `calibrate`).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

from . import registry
from .cost_model import CostModel, InvalidCostModel, load
from .priority import device_class

log = logging.getLogger(__name__)

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cost_models")


@functools.lru_cache(maxsize=None)
def shipped_model(gpu_class: str) -> Optional[CostModel]:
    """The model shipped with the pack for a GPU class, or None."""
    path = os.path.join(SHIPPED_DIR, f"{gpu_class}.json")
    if not os.path.exists(path):
        return None
    try:
        return load(path, registry.names(), source="default")
    except (OSError, InvalidCostModel) as error:
        log.warning("attention backends: ignoring the shipped cost model (%s); auto uses its rule table", error)
        return None


def model_for(device_type: str, capability: Optional[tuple[int, int]]) -> Optional[CostModel]:
    """The cost model `auto` uses on a device, or None for the rule table."""
    return shipped_model(device_class(device_type, capability))


def forget() -> None:
    shipped_model.cache_clear()
