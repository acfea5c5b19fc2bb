"""What the status route and `doctor` show about several devices: the GPUs, which pairs
have peer access, the links nvidia-smi names, the pairs timed so far, the group
`head_parallel` uses, and whether a process group (Ulysses) is initialised."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .heads import default_group
from .topology import measured_links, nvidia_smi_topology, peer_matrix, topology_links, visible_gpus


def parallel_status() -> dict:
    peers = peer_matrix()
    named = topology_links()
    links = [{"from": i, "to": j, "peer_access": peers[i][j], "nvidia_smi": named.get((i, j))}
             for i in range(len(peers)) for j in range(len(peers)) if i != j]
    return {
        "gpus": visible_gpus(),
        "links": links,
        "nvidia_smi_topology": nvidia_smi_topology() if torch.cuda.is_available() else None,
        "measured_links": measured_links(),
        "head_parallel": default_group().describe(),
        "process_group": _process_group(),
    }


def _process_group() -> dict:
    if not dist.is_available() or not dist.is_initialized():
        return {"initialised": False}
    return {"initialised": True, "backend": str(dist.get_backend()), "world_size": dist.get_world_size(),
            "rank": dist.get_rank()}


def render(status: dict) -> list[str]:
    """Lines for `doctor`."""
    lines = ["", "several devices:"]
    group = status["head_parallel"]
    members = ", ".join(group["devices"]) or "none"
    state = "ready" if not group["problems"] else "not ready: " + "; ".join(group["problems"])
    lines.append(f"  head_parallel group: {members} ({state})")
    for link in status["links"]:
        kind = link["nvidia_smi"] or ("peer access" if link["peer_access"] else "no peer access (staged)")
        lines.append(f"  cuda:{link['from']} -> cuda:{link['to']}: {kind}")
    for link in status["measured_links"]:
        lines.append(f"  measured {link['from']} -> {link['to']} ({link['path']}): {link['gbps']} GB/s")
    return lines
