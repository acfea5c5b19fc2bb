"""What `auto` knows about this machine beyond the rule table.

1. A cost model: this machine's calibration (`python -m attention calibrate`), else the
   model shipped for the GPU class (attention/cost_models/<class>.json), else none (the
   rule table decides).
2. `auto_tuned`'s saved decision for the exact call signature, when there is one: a
   measurement on this machine beats any prediction.

Calibrations are saved like tuning decisions (tuning_store.py): one JSON file, beside the
tuning file, entries filed under the machine fingerprint (GPU, driver, torch, kernel
packages), checked field by field on load; a damaged or foreign file is ignored with a
warning, never partly trusted. Answers are cached per device class for the process;
`forget()` drops them (after `calibrate`, in tests).
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import tempfile
from typing import Any, Optional

import torch

from . import registry
from .call import CallSignature
from .cost_model import CostModel, InvalidCostModel, load, parse
from .priority import device_class
from .tuning_store import InvalidTuningFile, _check_fingerprint, fingerprint, store_for
from .tuning_store import default_path as default_tuning_path

log = logging.getLogger(__name__)

FORMAT = "comfyui-attention-backends/calibration"
VERSION = 1
ENV_FILE = "ATTENTION_BACKENDS_CALIBRATION_FILE"
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cost_models")
CALIBRATED = "calibrated"
DEFAULT = "default"

# Folders besides the standalone default that hold tuning.json and calibration.json
# (ComfyUI's user directory, registered by the nodes).
_folders: list[str] = []


def default_folder() -> str:
    """Where the standalone tools keep their files: the tuning file's folder."""
    return os.path.dirname(os.path.abspath(default_tuning_path()))


def calibration_file(folder: Optional[str] = None) -> str:
    """$ATTENTION_BACKENDS_CALIBRATION_FILE, or calibration.json in `folder` (default: the
    tuning file's folder)."""
    configured = os.environ.get(ENV_FILE)
    if configured and folder is None:
        return configured
    return os.path.join(folder or default_folder(), "calibration.json")


def register_folder(folder: str) -> None:
    """Also read calibrations and tuning decisions from `folder` (ComfyUI's user directory),
    before the standalone default."""
    folder = os.path.abspath(folder)
    if folder not in _folders:
        _folders.insert(0, folder)
        forget()


def _calibration_files() -> list[str]:
    return list(dict.fromkeys([calibration_file(f) for f in _folders] + [calibration_file()]))


def _tuning_files() -> list[str]:
    return list(dict.fromkeys([os.path.join(f, "tuning.json") for f in _folders] + [default_tuning_path()]))


class InvalidCalibrationFile(ValueError):
    """Not a calibration file this version of the pack wrote."""


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise InvalidCalibrationFile(what)


def parse_file(text: str) -> list[dict[str, Any]]:
    """The machines of a calibration file, each {"fingerprint", "model" (a CostModel),
    "calibrated_at"}; raises InvalidCalibrationFile with the first problem."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise InvalidCalibrationFile(f"not JSON ({error})") from None
    _check(isinstance(data, dict), "the top level is not an object")
    _check(data.get("format") == FORMAT, f"format is {data.get('format')!r}, not {FORMAT!r}")
    _check(data.get("version") == VERSION, f"version is {data.get('version')!r}, not {VERSION}")
    machines = data.get("machines")
    _check(isinstance(machines, list), "machines is not a list")
    parsed = []
    for machine in machines:
        _check(isinstance(machine, dict), "a machine is not an object")
        try:
            _check_fingerprint(machine.get("fingerprint"))
            model = parse(machine.get("model"), registry.names(), source=CALIBRATED)
        except (InvalidTuningFile, InvalidCostModel) as error:
            raise InvalidCalibrationFile(str(error)) from None
        _check(isinstance(machine.get("calibrated_at", ""), str), "calibrated_at is not a string")
        parsed.append({"fingerprint": machine["fingerprint"], "model": model,
                       "calibrated_at": machine.get("calibrated_at", "")})
    return parsed


def _read(path: str) -> list[dict[str, Any]]:
    """The machines of one file; [] when it is absent or damaged (with a warning)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return parse_file(handle.read())
    except FileNotFoundError:
        return []
    except (OSError, InvalidCalibrationFile) as error:
        log.warning("attention backends: ignoring calibration file %s: %s. Run `python -m attention calibrate` "
                    "to write a new one; auto uses the shipped defaults meanwhile", path, error)
        return []


def save_calibration(model: CostModel, device: torch.device, path: Optional[str] = None) -> str:
    """File `model` under this machine's fingerprint (other machines' entries stay; a
    damaged file is moved to .ignored); returns the path."""
    path = path or calibration_file(_folders[0] if _folders else None)
    machine = fingerprint(device)
    others = []
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as handle:
                others = [m for m in parse_file(handle.read()) if m["fingerprint"] != machine]
        except (OSError, InvalidCalibrationFile):
            os.replace(path, path + ".ignored")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entries = [{"fingerprint": m["fingerprint"], "model": m["model"].to_json(), "calibrated_at": m["calibrated_at"]}
               for m in others]
    entries.append({"fingerprint": machine, "model": model.to_json(), "calibrated_at": stamp})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, prefix=".calibration-", suffix=".json",
                                         delete=False)
    try:
        with handle:
            json.dump({"format": FORMAT, "version": VERSION, "machines": entries}, handle, indent=1, sort_keys=True)
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise
    forget()
    return path


@functools.lru_cache(maxsize=None)
def shipped_model(gpu_class: str) -> Optional[CostModel]:
    """The model shipped with the pack for a GPU class, or None."""
    path = os.path.join(SHIPPED_DIR, f"{gpu_class}.json")
    if not os.path.exists(path):
        return None
    try:
        return load(path, registry.names(), source=DEFAULT)
    except (OSError, InvalidCostModel) as error:
        log.warning("attention backends: ignoring the shipped cost model (%s); auto uses its rule table", error)
        return None


def device_for(device_type: str, capability: Optional[tuple[int, int]]) -> Optional[torch.device]:
    """The first visible GPU a call signature can be on (calls carry a capability, not an
    index); None off CUDA, where SDPA is all `auto` has."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return None
    for index in range(torch.cuda.device_count()):
        if tuple(torch.cuda.get_device_capability(index)) == capability:
            return torch.device("cuda", index)
    return None


@functools.lru_cache(maxsize=None)
def _machine(device: torch.device) -> dict[str, Any]:
    """The device's fingerprint, once per process (it reads every kernel package's version;
    `auto` asks for it at every new call signature)."""
    return fingerprint(device)


@functools.lru_cache(maxsize=None)
def calibrated_model(device_type: str, capability: Optional[tuple[int, int]]) -> Optional[CostModel]:
    """This machine's calibration for the device, or None."""
    device = device_for(device_type, capability)
    if device is None:
        return None
    machine = _machine(device)
    for path in _calibration_files():
        for entry in _read(path):
            if entry["fingerprint"] == machine:
                return entry["model"]
    return None


def model_for(device_type: str, capability: Optional[tuple[int, int]]) -> Optional[CostModel]:
    """The cost model `auto` uses on a device, or None for the rule table."""
    return calibrated_model(device_type, capability) or shipped_model(device_class(device_type, capability))


def saved_choice(call: CallSignature) -> Optional[str]:
    """`auto_tuned`'s saved decision for this exact signature on this machine, or None."""
    from .tuning import signature_key  # tuning imports measure and torch timing; only needed here

    device = device_for(call.device_type, call.compute_capability)
    if device is None:
        return None
    key = signature_key(call)
    for path in _tuning_files():
        if os.path.exists(path):
            decision = store_for(path, device, machine=_machine).get(key)
            if decision is not None:
                return decision["backend"]
    return None


def describe(device_type: str, capability: Optional[tuple[int, int]]) -> dict[str, Any]:
    """What `auto` runs on for a device, for doctor and the status route."""
    calibrated = calibrated_model(device_type, capability)
    model = calibrated or shipped_model(device_class(device_type, capability))
    if model is None:
        return {"source": "rules", "gpu": None, "kernels": [], "files": _calibration_files()}
    described = {"source": model.source, "gpu": model.gpu, "kernels": sorted(model.kernels), "margin": model.margin,
                 "long_margin": model.long_margin, "corrected": model.correction is not None,
                 "files": _calibration_files()}
    # A calibration that rescaled the shipped model (cost_rescale.py): which, and the
    # levels it measured per kernel; kernels fitted afresh have none.
    levels = {name: {"host": fit["host"], "gpu": fit["gpu"]} for name, fit in sorted(model.fit.items())
              if isinstance(fit, dict) and "rescaled_from" in fit}
    if levels:
        described["rescaled_from"] = next(model.fit[name]["rescaled_from"] for name in levels)
        described["levels"] = levels
    return described


def forget() -> None:
    """Drop cached answers (after calibrating or editing a file; in tests)."""
    shipped_model.cache_clear()
    calibrated_model.cache_clear()
    _machine.cache_clear()
