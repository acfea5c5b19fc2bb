"""The GPUs of this machine and the links between them.

Facts come from PyTorch (`torch.cuda.can_device_access_peer`), from `nvidia-smi topo -m`
when the tool is on PATH (the link type: NV# for a bonded set of # NVLinks, PIX/PXB/
PHB/NODE/SYS for PCIe paths), and from one timed copy per device pair when head-parallel
attention first needs the pair's speed. Everything is cached for the process.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import subprocess
import threading
import time
from typing import Optional

import torch

from .cost import PEER, SAME, STAGED, Link

log = logging.getLogger(__name__)

# Assumed speeds, used until a pair is measured: 20 GB/s per NVLink and direction (NVLink 4
# is 25 GB/s nominal), 20 GB/s for PCIe peer copies, 10 GB/s through pinned host memory
# (two PCIe hops one after the other).
_NVLINK_GBPS = 20.0
_PCIE_PEER_GBPS = 20.0
_STAGED_GBPS = 10.0
# Bytes copied to time a link: large enough that the copy's fixed cost is noise.
_PROBE_BYTES = 64 << 20
_PROBE_REPEATS = 3
_TOPOLOGY_TIMEOUT_S = 10.0

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GPU = re.compile(r"^GPU(\d+)$")
_NVLINK = re.compile(r"^NV(\d+)$")

_measured: dict[tuple[torch.device, torch.device, bool], float] = {}
_measured_lock = threading.Lock()


def visible_gpus() -> list[dict]:
    """Index, name, memory and compute capability of every visible CUDA device."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}"})
    return gpus


def peer_matrix() -> list[list[bool]]:
    """peer[i][j]: device i can read and write device j's memory directly."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(count)] for i in range(count)]


@functools.lru_cache(maxsize=1)
def nvidia_smi_topology() -> Optional[str]:
    """The text of `nvidia-smi topo -m`, or None when the tool is missing or fails."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        done = subprocess.run([tool, "topo", "-m"], capture_output=True, text=True, timeout=_TOPOLOGY_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as error:
        log.info("attention backends: nvidia-smi topo -m failed: %s", error)
        return None
    if done.returncode != 0:
        log.info("attention backends: nvidia-smi topo -m exited %d: %s", done.returncode, done.stderr.strip())
        return None
    return _ANSI.sub("", done.stdout)


def parse_topology(text: str) -> dict[tuple[int, int], str]:
    """(i, j) -> the link nvidia-smi names between GPU i and GPU j ("NV18", "SYS", ...).

    The matrix's header lists GPU0..GPUn first (then NICs and affinity columns); each
    GPU row starts with its name, then one cell per header column.
    """
    links: dict[tuple[int, int], str] = {}
    columns: list[Optional[int]] = []
    for raw in _ANSI.sub("", text).splitlines():
        cells = _cells(raw)
        if not cells:
            continue
        if not columns and all(_GPU.match(c) for c in cells[:1]) and not raw[:1].strip():
            columns = [int(m.group(1)) if (m := _GPU.match(c)) else None for c in cells]
            continue
        row = _GPU.match(cells[0])
        if not columns or row is None:
            continue
        for column, cell in zip(columns, cells[1:]):
            if column is not None and column != int(row.group(1)):
                links[(int(row.group(1)), column)] = cell
    return links


def _cells(line: str) -> list[str]:
    parts = line.split("\t") if "\t" in line else line.split()
    return [p.strip() for p in parts if p.strip()]


@functools.lru_cache(maxsize=1)
def topology_links() -> dict[tuple[int, int], str]:
    text = nvidia_smi_topology()
    return parse_topology(text) if text else {}


def assumed_link(home: torch.device, remote: torch.device, staged: bool) -> Link:
    """The link between two devices from what the machine says, before any measurement."""
    if home.type != "cuda" or remote.type != "cuda" or (home == remote and not staged):
        return SAME
    if staged:
        return Link(STAGED, _STAGED_GBPS, "assumed (no peer access: through pinned host memory)")
    named = topology_links().get((home.index, remote.index))
    nvlink = _NVLINK.match(named or "")
    if nvlink:
        return Link(PEER, _NVLINK_GBPS * int(nvlink.group(1)), f"assumed from nvidia-smi {named}")
    return Link(PEER, _PCIE_PEER_GBPS, f"assumed from nvidia-smi {named}" if named else "assumed (PCIe peer)")


def has_peer_access(home: torch.device, remote: torch.device) -> bool:
    return home.type == remote.type == "cuda" and (
        home == remote or torch.cuda.can_device_access_peer(home.index, remote.index))


def measured_link(home: torch.device, remote: torch.device, staged: bool) -> Link:
    """The link timed with one copy of 64 MiB (best of three), once per pair and path.

    Synchronises both devices: call it while planning, never per attention call.
    """
    if home.type != "cuda" or (home == remote and not staged):
        return SAME
    key = (home, remote, staged)
    with _measured_lock:
        gbps = _measured.get(key)
        if gbps is None:
            gbps = _time_copy(home, remote, staged)
            _measured[key] = gbps
    return Link(STAGED if staged else PEER, gbps, "measured")


def measured_links() -> list[dict]:
    """Every pair timed so far in this process."""
    return [{"from": str(h), "to": str(r), "path": STAGED if s else PEER, "gbps": round(g, 1)}
            for (h, r, s), g in sorted(_measured.items(), key=lambda item: str(item[0]))]


def _time_copy(home: torch.device, remote: torch.device, staged: bool) -> float:
    source = torch.empty(_PROBE_BYTES, dtype=torch.uint8, device=home)
    best = float("inf")
    for _ in range(_PROBE_REPEATS):
        torch.cuda.synchronize(home)
        torch.cuda.synchronize(remote)
        begin = time.perf_counter()
        if staged:
            host = source.to("cpu", non_blocking=True)
            # The host-to-device copy runs on the remote device's stream: it must wait
            # for the device-to-host copy, which PyTorch cannot see through the host buffer.
            arrived = torch.cuda.Event()
            arrived.record(torch.cuda.current_stream(home))
            torch.cuda.current_stream(remote).wait_event(arrived)
            host.to(remote, non_blocking=True)
        else:
            source.to(remote, non_blocking=True)
        torch.cuda.synchronize(home)
        torch.cuda.synchronize(remote)
        best = min(best, time.perf_counter() - begin)
    return _PROBE_BYTES / best / 1e9
