"""Attention across the GPUs of one machine (issue 15): head_parallel in one process and
Ulysses over several, against one GPU, on Wan 2.1 14B 480p/720p and HunyuanVideo 720p
attention calls (B includes the CFG batch, as ComfyUI runs them).

head_parallel rows, per shape:
- `1 GPU`: Dispatcher(INNER) on cuda:0 (INNER: --inner, default `auto`);
- `n GPUs even`: Dispatcher("head_parallel > INNER") over the first n GPUs with every call
  split evenly (the cost model overruled, so each count is measured);
- `n GPUs cost model`: the same over every GPU, split as the cost model decides (what
  the backend does by default), with its prediction.
Each is timed as the caller sees it: CUDA events on cuda:0's stream around the call (that
stream waits for every lane), interleaved rounds (attention.measure). Reported with the
speedup over one GPU, the transfer share (per other GPU: lane time not spent in its
kernel, over the call time, from the group's CUDA-event timings), the output's error
against the one-GPU output (the same kernel per head: equal, or within rounding), and
peak memory per GPU.

Ulysses rows (--no-ulysses skips them): n processes (NCCL on GPUs, gloo with --smoke),
each holding 1/n of the tokens, the call through UlyssesAttention with INNER as the
local kernel; time = the slowest rank's median; the gathered output against the one-GPU
output.

Machine: `nvidia-smi topo -m` (saved as topology.txt), peer access, and each GPU pair's
copy speed, peer and through pinned host memory (one timed 64 MiB copy each).

NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 are set before torch loads (spawned processes inherit them), and
nothing here creates symmetric memory or multicast objects.

Usage:
    python benchmarks/multi_gpu.py --out DIR [--shapes wan_480p,wan_720p,hunyuan_720p]
        [--counts 1,2,4] [--inner auto] [--reps 5] [--no-ulysses]
    python benchmarks/multi_gpu.py --out DIR --smoke   # CPU "devices", tiny shapes: the same code runs
Writes DIR/multi_gpu.json, DIR/multi_gpu.md and DIR/topology.txt.
"""

from __future__ import annotations

import os

# Before torch (and NCCL) load; forced, not defaulted: the device tool requires them off.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(MULTICAST_OFF)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from attention import Dispatcher  # noqa: E402
from attention.bench.inputs import call_form, make_qkv  # noqa: E402
from attention.bench.report import environment  # noqa: E402
from attention.call import FLAT  # noqa: E402
from attention.measure import errors, interleaved_median_ms, time_ms  # noqa: E402
from attention.parallel import heads, topology  # noqa: E402
from attention.parallel.cost import CostModel, EvenSplit, apportion  # noqa: E402
from attention.parallel.ulysses import UlyssesAttention  # noqa: E402
from attention.shapes import ModelShape, by_key  # noqa: E402

log = logging.getLogger("multi_gpu")

DEFAULT_SHAPES = "wan_480p,wan_720p,hunyuan_720p"
SMOKE_SHAPES = (ModelShape("smoke_flat", "smoke (B,N,H*D)", 2, 8, 512, 512, 64, FLAT),
                ModelShape("smoke_heads_first", "smoke (B,H,N,D)", 1, 6, 384, 384, 64))
ULYSSES_TIMEOUT = datetime.timedelta(seconds=300)


def _shapes(args: argparse.Namespace) -> list[ModelShape]:
    if args.smoke:
        return list(SMOKE_SHAPES)
    return [by_key(key.strip()) for key in args.shapes.split(",") if key.strip()]


def _devices(args: argparse.Namespace, counts: list[int]) -> list[torch.device]:
    if args.smoke:
        return [torch.device("cpu")] * max(counts)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible: run with --smoke on a CPU")
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _peak_mib(devices: list[torch.device]) -> dict[str, float]:
    return {str(d): round(torch.cuda.max_memory_allocated(d) / 2**20, 1) for d in dict.fromkeys(devices)
            if d.type == "cuda"}


def _reset_peaks(devices: list[torch.device]) -> None:
    for device in dict.fromkeys(devices):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)


def machine(devices: list[torch.device], out: str) -> dict:
    """Topology, peer access and measured copy speeds; writes topology.txt."""
    text = topology.nvidia_smi_topology()
    with open(os.path.join(out, "topology.txt"), "w", encoding="utf-8") as handle:
        handle.write(text if text else "nvidia-smi topo -m: not available on this machine\n")
    gpus = [d for d in dict.fromkeys(devices) if d.type == "cuda"]
    links = []
    for home in gpus:
        for remote in gpus:
            if home == remote:
                continue
            peer = topology.has_peer_access(home, remote)
            row = {"from": str(home), "to": str(remote), "peer_access": peer,
                   "nvidia_smi": topology.topology_links().get((home.index, remote.index)),
                   "staged_gbps": round(topology.measured_link(home, remote, True).gbps, 1)}
            row["peer_gbps"] = round(topology.measured_link(home, remote, False).gbps, 1) if peer else None
            links.append(row)
    return {"gpus": topology.visible_gpus(), "links": links, "nvidia_smi_topology": text}


def head_parallel_rows(shape: ModelShape, devices: list[torch.device], counts: list[int],
                       args: argparse.Namespace) -> list[dict]:
    home = devices[0]
    q, k, v = make_qkv(shape, home, _dtype(home), seed=0)
    form = call_form(shape)
    single = Dispatcher(args.inner)
    reference = single(q, k, v, shape.heads, **form)
    setups = [("1 GPU", None, [home])]
    setups += [(f"{count} GPUs even", EvenSplit(), devices[:count]) for count in counts if 1 < count <= len(devices)]
    if len(devices) > 1:
        setups.append((f"{len(devices)} GPUs cost model", CostModel(), devices))
    variants: dict[str, tuple] = {}
    rows, calls = [], {}
    for name, policy, used in setups:
        if policy is None:
            dispatcher, group = single, None
        else:
            # A plan binds to the group configured when it is made: configure, then plan at once.
            group = heads.configure(used, policy=policy)
            dispatcher = Dispatcher(f"head_parallel > {args.inner}", strict=True)
        variants[name] = (dispatcher, group, used)
        out = dispatcher(q, k, v, shape.heads, **form)  # plans; measures the links it needs
        error = errors(out, reference)
        del out
        calls[name] = (lambda d=dispatcher: d(q, k, v, shape.heads, **form))
        rows.append({"shape": shape.key, "label": shape.label, "variant": name, "devices": [str(d) for d in used],
                     "rel_l1_vs_1gpu": error["rel_l1"], "max_abs_vs_1gpu": error["max_abs"]})
        if group is not None:
            group.begin_run()
    _reset_peaks(devices)
    times = interleaved_median_ms(calls, home, reps=args.reps, budget_s=args.budget, min_reps=args.reps)
    peaks = _peak_mib(devices)
    for row in rows:
        _, group, _ = variants[row["variant"]]
        row["ms"] = round(times[row["variant"]], 3)
        row["speedup"] = round(times["1 GPU"] / times[row["variant"]], 3)
        if group is not None:
            summary = group.end_run()
            row.update(_split_facts(summary))
    rows[0]["peak_mib_all_variants"] = peaks
    return rows


def _split_facts(summary: dict) -> dict:
    signature = summary["signatures"][0] if summary["signatures"] else {}
    call_ms = signature.get("timed_call_ms")
    remote = [d for d in summary["per_device"] if d["transfer_ms_per_call"] is not None]
    return {
        "split": signature.get("split"), "decision": signature.get("decision"),
        "prediction": signature.get("prediction"), "timed_call_ms": call_ms,
        "per_device": summary["per_device"], "served": summary["served"], "dropped": summary["dropped"],
        "transfer_share": (round(max(d["transfer_ms_per_call"] for d in remote) / call_ms, 4)
                           if remote and call_ms else None),
    }


def _ulysses_worker(rank: int, world: int, shape: ModelShape, args: argparse.Namespace, init: str,
                    result_path: str) -> None:
    smoke = args.smoke
    device = torch.device("cpu") if smoke else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if smoke else "nccl", init_method="file://" + init, rank=rank, world_size=world,
                            timeout=ULYSSES_TIMEOUT)
    try:
        q, k, v = make_qkv(shape, device, _dtype(device), seed=0)
        form = call_form(shape)
        lens = apportion(shape.seq_q, [1.0] * world)
        start = sum(lens[:rank])
        mine = slice(start, start + lens[rank])
        token_axis = 2 if form["skip_reshape"] else 1
        shard = [t.narrow(token_axis, mine.start, lens[rank]) for t in (q, k, v)]
        attention = UlyssesAttention(Dispatcher(args.inner))

        def call():
            return attention(*shard, shape.heads, **form, seq_lens_q=lens, seq_lens_k=lens)
        out = call()
        for _ in range(2):
            call()
        dist.barrier()
        samples = [time_ms(call, device) for _ in range(args.reps)]
        median = statistics.median(samples)
        medians: list = [None] * world
        dist.all_gather_object(medians, median)
        pieces = [torch.empty_like(out) for _ in range(world)] if len(set(lens)) == 1 else None
        if pieces is not None:
            dist.all_gather(pieces, out.contiguous())
        if rank == 0:
            row = {"ms_per_rank": [round(m, 3) for m in medians], "ms": round(max(medians), 3)}
            if pieces is not None:
                whole = torch.cat(pieces, dim=token_axis)
                row.update({f"{key}_vs_1gpu": value for key, value in
                            errors(whole, Dispatcher(args.inner)(q, k, v, shape.heads, **form)).items()
                            if key in ("rel_l1", "max_abs")})
            with open(result_path, "w", encoding="utf-8") as handle:
                json.dump(row, handle)
    finally:
        dist.destroy_process_group()


def ulysses_rows(shape: ModelShape, devices: list[torch.device], counts: list[int], single_ms: float,
                 args: argparse.Namespace) -> list[dict]:
    rows = []
    for count in counts:
        if not 1 < count <= len(devices):
            continue
        with tempfile.TemporaryDirectory() as scratch:
            result = os.path.join(scratch, "result.json")
            try:
                mp.start_processes(_ulysses_worker, args=(count, shape, args, os.path.join(scratch, "init"), result),
                                   nprocs=count, join=True, start_method="spawn")
                with open(result, encoding="utf-8") as handle:
                    row = json.load(handle)
            except Exception as error:  # a failed configuration is a result, not the end of the run
                row = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1:]}"}
        row.update({"shape": shape.key, "label": shape.label, "variant": f"ulysses {count} processes",
                    "devices": [str(d) for d in devices[:count]]})
        if "ms" in row:
            row["speedup"] = round(single_ms / row["ms"], 3)
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    lines = ["| shape | variant | ms | speedup | transfer share | decision / prediction | rel. L1 vs 1 GPU |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        prediction = row.get("prediction") or {}
        decided = (f"predicted {prediction['gain']:.2f}x" if prediction else "") + (
            "" if row.get("split", True) else " (kept local)")
        share = row.get("transfer_share")
        error = row.get("rel_l1_vs_1gpu")
        lines.append(f"| {row['label']} | {row['variant']} | {row.get('ms', row.get('error', '–'))} | "
                     f"{row.get('speedup', '–')} | {'–' if share is None else f'{share:.1%}'} | {decided or '–'} | "
                     f"{'–' if error is None else f'{error:.2e}'} |")
    links = results["machine"]["links"]
    if links:
        lines += ["", "| from | to | nvidia-smi | peer GB/s | staged GB/s |", "|---|---|---|---|---|"]
        lines += [f"| {l['from']} | {l['to']} | {l['nvidia_smi'] or '–'} | {l['peer_gbps'] or '–'} | "
                  f"{l['staged_gbps']} |" for l in links]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for multi_gpu.json, multi_gpu.md, topology.txt")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"attention.shapes keys (default {DEFAULT_SHAPES})")
    parser.add_argument("--counts", default="1,2,4", help="GPU counts to measure (those visible; default 1,2,4)")
    parser.add_argument("--inner", default="auto", help="the priority each GPU (or process) uses (default auto)")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timing per shape (default 20)")
    parser.add_argument("--no-ulysses", dest="ulysses", action="store_false", help="skip the Ulysses rows")
    parser.add_argument("--smoke", action="store_true", help="CPU 'devices' and tiny shapes: proves the script runs")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.makedirs(args.out, exist_ok=True)
    counts = sorted({int(c) for c in args.counts.split(",") if c.strip()})
    devices = _devices(args, counts)
    counts = [c for c in counts if c <= len(devices)]
    results = {"environment": {**environment(), "multicast_off": MULTICAST_OFF, "visible_gpus": len(
        [d for d in dict.fromkeys(devices) if d.type == "cuda"])}, "machine": machine(devices, args.out), "rows": []}
    for shape in _shapes(args):
        log.info("%s: head_parallel on %s", shape.label, ", ".join(map(str, counts)))
        rows = head_parallel_rows(shape, devices[:max(counts)], counts, args)
        results["rows"] += rows
        if args.ulysses and (not args.smoke or shape is SMOKE_SHAPES[0]):  # smoke: one shape shows it runs
            log.info("%s: Ulysses", shape.label)
            results["rows"] += ulysses_rows(shape, devices, counts, rows[0]["ms"], args)
        if devices[0].type == "cuda":
            torch.cuda.empty_cache()
        _write(results, args.out)
    print(markdown(results))
    heads.configure()
    return 0


def _write(results: dict, out: str) -> None:
    with open(os.path.join(out, "multi_gpu.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1, default=str)
    with open(os.path.join(out, "multi_gpu.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
