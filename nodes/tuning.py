"""`auto_tuned` inside ComfyUI, and `auto`'s timing of contested calls: where decisions
are saved, the node's tuning choice, and what the status route shows of them."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..attention import Priority, cost_store
from ..attention.errors import describe_exception
from ..attention.tuning import Tuner, auto_measured_path, auto_measures
from ..attention.tuning_store import store_for

log = logging.getLogger(__name__)

# Decisions the status route lists per GPU, the newest first chosen: the sidebar shows
# what was tuned lately, and a file with a thousand decisions stays a small response.
STATUS_DECISIONS = 50

REUSE = "reuse saved"
RETUNE = "re-tune"
TUNING_MODES = (REUSE, RETUNE)


def tuning_file() -> str:
    """ComfyUI's user directory holds the decisions (next to settings and workflows),
    so they survive updates of the pack and follow --user-directory."""
    import folder_paths
    return os.path.join(folder_paths.get_user_directory(), "attention_backends", "tuning.json")


def register_user_folder() -> None:
    """`auto` reads this machine's calibration and auto_tuned's saved decisions from the
    user directory too (cost_store.py); `python -m attention calibrate --file` writes there."""
    cost_store.register_folder(os.path.dirname(tuning_file()))


def make_tuner(priority: Priority, mode: str) -> Tuner | None:
    """A tuner for a node whose priority uses auto_tuned; None otherwise."""
    if mode not in TUNING_MODES:
        raise ValueError(f"tuning must be one of {TUNING_MODES}, not {mode!r}")
    if not priority.uses_tuner:
        return None
    return Tuner(tuning_file(), retune=mode == RETUNE)


def make_measurer(priority: Priority, mode: str) -> Tuner | None:
    """The tuner with which `auto` times the kernels its cost model cannot separate on a
    call (attention.cost_model.contested), saving beside auto_tuned's file; None when
    the priority does not name `auto` or ATTENTION_BACKENDS_AUTO_MEASURE is 0. The node's
    tuning choice applies: `re-tune` measures those calls again too."""
    if mode not in TUNING_MODES:
        raise ValueError(f"tuning must be one of {TUNING_MODES}, not {mode!r}")
    if not priority.uses_auto or not auto_measures():
        return None
    return Tuner(auto_measured_path(tuning_file()), retune=mode == RETUNE)


def tuning_status() -> dict[str, Any]:
    """auto_tuned's saved decisions (file_status of tuning.json)."""
    return file_status(tuning_file())


def auto_measured_status() -> dict[str, Any]:
    """The contested calls `auto` has timed and saved (file_status of auto_measured.json)."""
    return file_status(auto_measured_path(tuning_file()))


def file_status(path: str) -> dict[str, Any]:
    """The decisions saved in `path` for each visible GPU, with the measurements behind
    them: how many there are (`count`) and the STATUS_DECISIONS newest, sorted by signature."""
    if torch.cuda.is_available():
        targets = [(index, torch.device("cuda", index)) for index in range(torch.cuda.device_count())]
    else:
        targets = [(None, torch.device("cpu"))]  # auto_tuned tunes on the CPU too
    return {"file": path, "exists": os.path.exists(path), "listed_at_most": STATUS_DECISIONS,
            "devices": [_device_status(path, index, device) for index, device in targets]}


def _device_status(path: str, index: int | None, device: torch.device) -> dict[str, Any]:
    row: dict[str, Any] = {"index": index, "type": device.type}
    try:
        store = store_for(path, device)
    except Exception as error:  # the status route answers whatever the file or the GPU does
        log.exception("attention backends: cannot load the tuning decisions of %s from %s", device, path)
        return {**row, "fingerprint": None, "ignored_file_problem": f"cannot load: {describe_exception(error)}",
                "count": 0, "decisions": []}
    listed = store.newest(STATUS_DECISIONS)
    return {**row, "fingerprint": store.machine, "ignored_file_problem": store.problem, "count": len(store),
            "decisions": [{"signature": key, **decision} for key, decision in sorted(listed.items())]}
