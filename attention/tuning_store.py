"""Where `auto_tuned` remembers its decisions: one JSON file, per machine fingerprint.

A decision is only worth reusing on the machine that measured it, so decisions are
filed under a fingerprint: GPU name and capability, driver, torch with its CUDA and
cuDNN, and the version of every kernel package installed. A file is data and nothing
else: it is read as UTF-8 JSON, checked field by field, and a file that fails any check
(damaged, not UTF-8, nested too deeply, hand-edited wrongly, written by something else)
is ignored with one warning and moved aside on the next save, never partly trusted.

Bounded: each fingerprint keeps its MAX_DECISIONS newest decisions and the file keeps
MAX_MACHINES fingerprints (this machine's and the most recently tuned others); older
ones are dropped when the file is written. Written once per sampler run: `put` only
remembers a decision, `flush` (called at the end of the run) writes the file, atomically.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import tempfile
import threading
from typing import Any, Callable, Optional

import torch

from . import registry
from .backend import installed_version
from .json_values import finite_number

log = logging.getLogger(__name__)

FORMAT = "comfyui-attention-backends/tuning"
VERSION = 1
ENV_FILE = "ATTENTION_BACKENDS_TUNING_FILE"
# Keys in a decision's measurement of one candidate, all numbers or null.
_MEASURED_NUMBERS = ("ms", "rel_l1", "cosine", "max_abs", "nonfinite")
_SIGNATURE_KEY = re.compile(r"[A-Za-z0-9_.,:|*=+\-]{1,300}")
# Decisions kept per fingerprint: a workflow meets a few call shapes per model and
# resolution, so a thousand covers many of both; beyond it the oldest go first.
MAX_DECISIONS = 1000
# Fingerprints kept in a file: every driver, torch or kernel upgrade starts a new one.
MAX_MACHINES = 8
# A file larger than this is not one the bounds above let the pack write (about 1.5 kB a
# decision): it is ignored rather than read into memory.
MAX_FILE_BYTES = 64 << 20


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
    _check(value is None or finite_number(value), f"{what} is not a finite number")


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


def _decode(data: bytes | str) -> str:
    if isinstance(data, str):
        return data
    if len(data) > MAX_FILE_BYTES:
        raise InvalidTuningFile(f"larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8-sig")  # a byte order mark some Windows editors add is no damage
    except UnicodeDecodeError as error:
        # Notepad's "Unicode" is UTF-16: say what the file is, not just which byte failed.
        raise InvalidTuningFile(f"not UTF-8 text ({error.reason} at byte {error.start})") from None


def parse(data: bytes | str) -> list[dict[str, Any]]:
    """The machines of a tuning file (its bytes, or its text), each {"fingerprint",
    "decisions"}; raises InvalidTuningFile with the first problem found."""
    text = _decode(data)
    try:
        parsed = json.loads(text)
    except ValueError as error:
        raise InvalidTuningFile(f"not JSON ({error})") from None
    except RecursionError:
        raise InvalidTuningFile("not a tuning file: JSON nested too deeply") from None
    _check(isinstance(parsed, dict), "the top level is not an object")
    _check(parsed.get("format") == FORMAT, f"format is {parsed.get('format')!r}, not {FORMAT!r}")
    _check(parsed.get("version") == VERSION, f"version is {parsed.get('version')!r}, not {VERSION}")
    machines = parsed.get("machines")
    _check(isinstance(machines, list), "machines is not a list")
    for machine in machines:
        _check(isinstance(machine, dict), "a machine is not an object")
        _check_fingerprint(machine.get("fingerprint"))
        decisions = machine.get("decisions")
        _check(isinstance(decisions, dict), "decisions is not an object")
        for key, decision in decisions.items():
            _check_decision(key, decision)
    return machines


def _age(item: tuple[str, dict[str, Any]]) -> tuple[str, str]:
    """Sort key of a (signature, decision) pair, oldest first (tuned_at is UTC ISO 8601;
    a decision without one counts as oldest)."""
    key, decision = item
    return decision.get("tuned_at") or "", key


def _newest(decisions: dict[str, dict[str, Any]], limit: int) -> dict[str, dict[str, Any]]:
    """The `limit` most recently tuned of `decisions`."""
    if len(decisions) <= limit:
        return dict(decisions)
    return dict(sorted(decisions.items(), key=_age)[len(decisions) - limit:])


def _read(path: str) -> bytes:
    """The file's bytes, at most one more than MAX_FILE_BYTES (enough to refuse it)."""
    with open(path, "rb") as handle:
        return handle.read(MAX_FILE_BYTES + 1)


class TuningStore:
    """The decisions of one file for one machine fingerprint: loaded once, changed in
    memory, written by `flush`.

    Decisions of other fingerprints in the file (another GPU, an older torch) are kept
    when writing: the file is read again just before each write, so machines sharing a
    user directory, and the GPUs of one machine, do not erase each other.
    """

    def __init__(self, path: str, machine: dict[str, Any], *, max_decisions: int = MAX_DECISIONS,
                 max_machines: int = MAX_MACHINES) -> None:
        self.path = path
        self.machine = machine
        self.max_decisions = max_decisions
        self.max_machines = max_machines
        self._lock = threading.Lock()
        self._decisions: dict[str, dict[str, Any]] = {}
        self._dirty = False  # changed since the file was read or written
        self.problem: Optional[str] = None  # why the file on disk was ignored, for the status route
        self._load()

    def _load(self) -> None:
        try:
            data = _read(self.path)
        except FileNotFoundError:
            return
        except OSError as error:
            self.problem = f"cannot read: {error}"
            log.warning("attention backends: cannot read tuning file %s (%s); tuning afresh", self.path, error)
            return
        try:
            machines = parse(data)
        except InvalidTuningFile as error:
            self.problem = str(error)
            log.warning("attention backends: ignoring tuning file %s: %s. Nothing in it is used; it will be "
                        "moved to %s.ignored when new decisions are saved", self.path, error, self.path)
            return
        for machine in machines:
            if machine["fingerprint"] == self.machine:
                self._decisions = _newest(machine["decisions"], self.max_decisions)
                if len(self._decisions) < len(machine["decisions"]):
                    self._dirty = True  # the next write leaves the file within its bound
                    log.info("attention backends: tuning file %s holds %d decisions for this machine; using the "
                             "%d newest", self.path, len(machine["decisions"]), self.max_decisions)

    def get(self, key: str) -> Optional[dict[str, Any]]:
        return self._decisions.get(key)

    def decisions(self) -> dict[str, dict[str, Any]]:
        return dict(self._decisions)

    def newest(self, limit: int) -> dict[str, dict[str, Any]]:
        """The `limit` most recently tuned decisions."""
        with self._lock:
            return _newest(self._decisions, limit)

    def __len__(self) -> int:
        return len(self._decisions)

    def put(self, key: str, decision: dict[str, Any]) -> None:
        """Remember a decision (written by the next `flush`); past `max_decisions`, the
        oldest is forgotten."""
        _check_decision(key, decision)
        with self._lock:
            self._decisions[key] = decision
            if len(self._decisions) > self.max_decisions:
                del self._decisions[min(self._decisions.items(), key=_age)[0]]
            self._dirty = True

    def clear(self) -> int:
        """Forget this machine's decisions (other machines' stay; written by the next
        `flush`); returns how many."""
        with self._lock:
            count = len(self._decisions)
            self._decisions.clear()
            self._dirty = True
        return count

    def flush(self) -> bool:
        """Write the file if anything changed since it was read or written; True if written.
        Raises OSError when it cannot be (the decisions stay in memory)."""
        with self._lock:
            if not self._dirty:
                return False
            self._write()
            self._dirty = False
            self.problem = None  # a file that was ignored has been moved aside and replaced
            return True

    def _other_machines(self) -> list[dict[str, Any]]:
        """The other fingerprints' entries as the file holds them now; a file that fails
        the checks is moved aside (kept for the user to inspect), never merged."""
        try:
            machines = parse(_read(self.path))
        except FileNotFoundError:
            return []
        except InvalidTuningFile as error:
            os.replace(self.path, self.path + ".ignored")
            log.warning("attention backends: moved the unusable tuning file %s to %s.ignored (%s)", self.path,
                        self.path, error)
            return []
        others = [{"fingerprint": machine["fingerprint"],
                   "decisions": _newest(machine["decisions"], self.max_decisions)}
                  for machine in machines if machine["fingerprint"] != self.machine and machine["decisions"]]
        # The most recently tuned fingerprints stay; an old driver's or torch's go first.
        others.sort(key=lambda machine: max(_age(item) for item in machine["decisions"].items()), reverse=True)
        return others[:self.max_machines - 1]

    def _write(self) -> None:
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
                handle.flush()
                os.fsync(handle.fileno())  # the new file is complete before it replaces the old one
            _warn_if_link(self.path)
            os.replace(handle.name, self.path)
        except BaseException:
            os.unlink(handle.name)
            raise


def _warn_if_link(path: str) -> None:
    """The file is replaced, never written through: a link (to a shared file, or anywhere
    else the server's user can write) becomes a plain file here and its target stays as
    it was. Said once per write, because decisions the user meant to share stop going there."""
    if os.path.islink(path):
        log.warning("attention backends: the tuning file %s is a symbolic link to %s; the pack never writes "
                    "through a link, so the decisions (those read from it included) are saved in a plain file "
                    "at %s and %s is left as it was. To share decisions between installs, point ComfyUI's "
                    "--user-directory at the shared folder instead", path, os.path.realpath(path), path,
                    os.path.realpath(path))


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
    """Drop the per-process cache, unwritten decisions included (tests; after editing the
    file by hand)."""
    with _stores_lock:
        _stores.clear()


def flush_loaded_stores() -> None:
    """Write what the loaded stores hold unwritten. Runs at exit, for decisions made where
    no sampler run ends (a script driving a Dispatcher); ComfyUI writes after each run."""
    with _stores_lock:
        stores = list(_stores.values())
    for store in stores:
        try:
            store.flush()
        except OSError as error:
            log.warning("attention backends: cannot save tuning decisions to %s (%s)", store.path, error)


atexit.register(flush_loaded_stores)
