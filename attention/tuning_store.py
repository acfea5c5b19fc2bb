"""Where `auto_tuned` remembers its decisions: one JSON file, per machine fingerprint.

A decision is only worth reusing on the machine that measured it, so decisions are
filed under a fingerprint: GPU name and capability, driver, torch with its CUDA and
cuDNN, and the version of every kernel package installed. A file is data and nothing
else: it is parsed as JSON, checked field by field, and a file that fails any check
(damaged, hand-edited wrongly, written by something else) is ignored with a warning
and moved aside on the next save, never partly trusted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import threading
from typing import Any, Callable, Optional

import torch

from . import registry
from .backend import installed_version

log = logging.getLogger(__name__)

FORMAT = "comfyui-attention-backends/tuning"
VERSION = 1
ENV_FILE = "ATTENTION_BACKENDS_TUNING_FILE"
# Keys in a decision's measurement of one candidate, all numbers or null.
_MEASURED_NUMBERS = ("ms", "rel_l1", "cosine", "max_abs", "nonfinite")
_SIGNATURE_KEY = re.compile(r"[A-Za-z0-9_.,:|*=+\-]{1,300}")


class InvalidTuningFile(ValueError):
    """The file is not a tuning file this version of the pack wrote."""


def default_path() -> str:
    """The file outside ComfyUI (`python -m attention`, tests): $ATTENTION_BACKENDS_TUNING_FILE
    or ~/.cache/attention_backends/tuning.json. The node uses ComfyUI's user directory."""
    configured = os.environ.get(ENV_FILE)
    if configured:
        return configured
    return os.path.join(os.path.expanduser("~"), ".cache", "attention_backends", "tuning.json")


def _driver_version() -> Optional[str]:
    """The NVIDIA kernel driver's version where Linux exposes it, else CUDA's driver API level."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as handle:
            match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", handle.read())
            if match:
                return match.group(1)
    except OSError:
        pass
    get_version = getattr(torch._C, "_cuda_getDriverVersion", None)
    if torch.cuda.is_available() and get_version is not None:
        return f"cuda-driver-api {get_version()}"
    return None


def fingerprint(device: torch.device) -> dict[str, Any]:
    """What must be equal for a saved decision to hold: the GPU, its driver, torch and
    every kernel package's version (an upgrade can change which kernel wins)."""
    packages: dict[str, str] = {}
    for backend in registry.all_backends():
        if backend.package is not None:
            version = installed_version(backend.package.distribution)
            if version is not None:
                packages[backend.package.distribution] = version
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(index)
        capability = "%d.%d" % torch.cuda.get_device_capability(index)
    else:
        gpu, capability = device.type, None
    return {
        "gpu": gpu,
        "capability": capability,
        "driver": _driver_version() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None,
        "packages": dict(sorted(packages.items())),
    }


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise InvalidTuningFile(what)


def _check_number(value: Any, what: str) -> None:
    _check(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and math.isfinite(value)), f"{what} is not a finite number")


def _check_fingerprint(value: Any) -> None:
    _check(isinstance(value, dict), "a fingerprint is not an object")
    for key, item in value.items():
        if key == "packages":
            _check(isinstance(item, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in item.items()),
                   "fingerprint packages are not name: version strings")
        else:
            _check(item is None or isinstance(item, str), f"fingerprint field {key!r} is not a string")


def _check_decision(key: Any, value: Any) -> None:
    _check(isinstance(key, str) and _SIGNATURE_KEY.fullmatch(key) is not None, f"bad signature key {key!r}")
    _check(isinstance(value, dict), f"decision for {key} is not an object")
    _check(value.get("backend") in registry.names(), f"decision for {key} names no known backend")
    _check_number(value.get("tuning_ms"), f"tuning_ms of {key}")
    _check_number(value.get("noise_floor"), f"noise_floor of {key}")
    _check(isinstance(value.get("reference"), str) and value["reference"] in registry.names(),
           f"decision for {key} names no known reference backend")
    budget = value.get("budget", {})
    _check(isinstance(budget, dict), f"budget of {key} is not an object")
    for field, number in budget.items():
        _check_number(number, f"budget {field!r} of {key}")
    _check(isinstance(value.get("tuned_at", ""), str), f"tuned_at of {key} is not a string")
    candidates = value.get("candidates")
    _check(isinstance(candidates, dict), f"candidates of {key} are not an object")
    for name, measured in candidates.items():
        _check(name in registry.names(), f"candidate {name!r} of {key} is not a backend")
        _check(isinstance(measured, dict), f"measurement of {name} for {key} is not an object")
        for field in _MEASURED_NUMBERS:
            _check_number(measured.get(field), f"{field} of {name} for {key}")
        _check(isinstance(measured.get("verdict"), str), f"verdict of {name} for {key} is not a string")


def parse(text: str) -> list[dict[str, Any]]:
    """The machines of a tuning file, each {"fingerprint", "decisions"}; raises
    InvalidTuningFile with the first problem found."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise InvalidTuningFile(f"not JSON ({error})") from None
    _check(isinstance(data, dict), "the top level is not an object")
    _check(data.get("format") == FORMAT, f"format is {data.get('format')!r}, not {FORMAT!r}")
    _check(data.get("version") == VERSION, f"version is {data.get('version')!r}, not {VERSION}")
    machines = data.get("machines")
    _check(isinstance(machines, list), "machines is not a list")
    for machine in machines:
        _check(isinstance(machine, dict), "a machine is not an object")
        _check_fingerprint(machine.get("fingerprint"))
        decisions = machine.get("decisions")
        _check(isinstance(decisions, dict), "decisions is not an object")
        for key, decision in decisions.items():
            _check_decision(key, decision)
    return machines


class TuningStore:
    """The decisions of one file for one machine fingerprint, loaded once, saved on change.

    Decisions of other fingerprints in the file (another GPU, an older torch) are kept
    untouched when saving: the file is read again just before each write, so machines
    sharing a user directory, and the GPUs of one machine, do not erase each other.
    """

    def __init__(self, path: str, machine: dict[str, Any]) -> None:
        self.path = path
        self.machine = machine
        self._lock = threading.Lock()
        self._decisions: dict[str, dict[str, Any]] = {}
        self.problem: Optional[str] = None  # why the file on disk was ignored, for the status route
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            return
        except OSError as error:
            self.problem = f"cannot read: {error}"
            log.warning("attention backends: cannot read tuning file %s (%s); tuning afresh", self.path, error)
            return
        try:
            machines = parse(text)
        except InvalidTuningFile as error:
            self.problem = str(error)
            log.warning("attention backends: ignoring tuning file %s: %s. Nothing in it is used; it will be "
                        "moved to %s.ignored when new decisions are saved", self.path, error, self.path)
            return
        for machine in machines:
            if machine["fingerprint"] == self.machine:
                self._decisions = dict(machine["decisions"])

    def get(self, key: str) -> Optional[dict[str, Any]]:
        return self._decisions.get(key)

    def decisions(self) -> dict[str, dict[str, Any]]:
        return dict(self._decisions)

    def put(self, key: str, decision: dict[str, Any]) -> None:
        """Remember a decision and write the file (atomically: a crash leaves the old file)."""
        _check_decision(key, decision)
        with self._lock:
            self._decisions[key] = decision
            self._save()

    def clear(self) -> int:
        """Forget this machine's decisions (other machines' stay); returns how many."""
        with self._lock:
            count = len(self._decisions)
            self._decisions.clear()
            self._save()
        return count

    def _other_machines(self) -> list[dict[str, Any]]:
        """The other fingerprints' entries as the file holds them now; a file that fails
        the checks is moved aside (kept for the user to inspect), never merged."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                machines = parse(handle.read())
        except FileNotFoundError:
            return []
        except InvalidTuningFile:
            os.replace(self.path, self.path + ".ignored")
            return []
        return [machine for machine in machines if machine["fingerprint"] != self.machine]

    def _save(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        machines = self._other_machines() + ([{"fingerprint": self.machine, "decisions": self._decisions}]
                                             if self._decisions else [])
        payload = {"format": FORMAT, "version": VERSION, "machines": machines}
        handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, prefix=".tuning-",
                                             suffix=".json", delete=False)
        try:
            with handle:
                json.dump(payload, handle, indent=1, sort_keys=True)
            os.replace(handle.name, self.path)
        except BaseException:
            os.unlink(handle.name)
            raise


_stores: dict[tuple[str, str], TuningStore] = {}
_stores_lock = threading.Lock()


def store_for(path: str, device: torch.device,
              machine: Optional[Callable[[torch.device], dict[str, Any]]] = None) -> TuningStore:
    """The store of `path` for this machine, loaded once per process (every node using
    `auto_tuned` shares it, so a decision made by one is reused by the next)."""
    info = (machine or fingerprint)(device)
    key = (os.path.abspath(path), json.dumps(info, sort_keys=True))
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = TuningStore(path, info)
        return store


def forget_loaded_stores() -> None:
    """Drop the per-process cache (tests; after editing the file by hand)."""
    with _stores_lock:
        _stores.clear()
