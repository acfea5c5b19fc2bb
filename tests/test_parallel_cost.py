"""The head-parallel cost model on the model shapes (synthetic devices, no GPU), the
apportioning of heads, and the reading of `nvidia-smi topo -m`."""

from __future__ import annotations

import math

import pytest
import torch

from attention.call import MASK_ADDITIVE, MASK_BOOL
from attention.parallel.cost import (PEER, SAME, STAGED, CostModel, EvenSplit, Link, Share, Traffic, apportion,
                                     at_tflops, predicted_kernel_ms, share_call)
from attention.parallel.topology import parse_topology
from attention.shapes import by_key

GPUS = [torch.device("cuda", i) for i in range(4)]
NVLINK = Link(PEER, 370.0, "test")     # about what one H200 pair moves over NVLink
PCIE_STAGED = Link(STAGED, 10.0, "test")
H200 = CostModel(kernel_ms=at_tflops(lambda device: 750.0))


def nvlink(home, remote):
    return SAME if home == remote else NVLINK


def unlimited(device):
    return None


def choose(key, devices, link=nvlink, model=H200, room=unlimited, **changes):
    call = by_key(key).signature()
    if changes:
        import dataclasses
        call = dataclasses.replace(call, **changes)
    return model.choose(call, GPUS[0], devices, link, room)


@pytest.mark.parametrize("count,target", [(2, 1.8), (4, 3.4)])
def test_wan_720p_splits_with_the_issue_target_predicted(count, target):
    choice = choose("wan_720p", GPUS[:count])
    assert choice.split and len(choice.shares) == count
    assert choice.prediction.gain >= target
    assert sum(s.heads for s in choice.shares) == 40
    home = choice.shares[0]
    assert home.device == GPUS[0] and home.heads >= max(s.heads for s in choice.shares[1:])


@pytest.mark.parametrize("key", ["wan_480p", "hunyuan_720p"])
def test_video_calls_split(key):
    assert choose(key, GPUS[:2]).split


@pytest.mark.parametrize("key", ["sd15_l1", "sdxl_l2", "sdxl_cross", "flux_1024"])
def test_image_calls_stay_on_one_gpu(key):
    choice = choose(key, GPUS[:2])
    assert not choice.split and choice.reason.startswith("too small to gain")


def test_a_slow_link_gets_a_smaller_share_and_a_slower_one_none():
    staged = choose("wan_720p", GPUS[:2], link=lambda h, r: SAME if h == r else PCIE_STAGED)
    assert staged.split and staged.shares[0].heads > staged.shares[1].heads
    assert staged.prediction.gain < choose("wan_720p", GPUS[:2]).prediction.gain
    crawl = Link(STAGED, 1.0, "test")
    assert not choose("wan_720p", GPUS[:2], link=lambda h, r: SAME if h == r else crawl).split


def test_a_device_listed_twice_is_one_processor():
    choice = choose("wan_720p", [GPUS[0], GPUS[0]])
    assert not choice.split and choice.prediction.gain < 1.001


def test_short_of_memory_on_the_other_gpu_stays_local():
    choice = choose("wan_720p", GPUS[:2], room=lambda d: 16 << 20)
    assert not choice.split and "GiB free" in choice.reason


def test_shares_fit_the_memory_the_other_gpu_has():
    room = 3 << 30
    choice = choose("wan_720p", GPUS[:2], room=lambda d: room)
    assert choice.split
    traffic = Traffic(by_key("wan_720p").signature())
    remote = choice.shares[1]
    assert H200.memory_headroom * (traffic.bytes_in(remote) + traffic.bytes_out(remote)) <= room


def test_home_outside_the_group_sends_every_share():
    call = by_key("wan_720p").signature()
    choice = H200.choose(call, GPUS[3], GPUS[:2], nvlink, unlimited)
    assert choice.split and {s.device for s in choice.shares} == set(GPUS[:2])


def test_gqa_shares_keep_key_heads_whole():
    choice = choose("wan_720p", GPUS[:3], heads_kv=8)
    assert choice.split
    for share in choice.shares:
        assert share.heads == (share.kv_stop - share.kv_start) * 5
    assert [s.kv_start for s in choice.shares[1:]] == [s.kv_stop for s in choice.shares[:-1]]


def test_even_split_ignores_the_prediction():
    call = by_key("sdxl_cross").signature()
    choice = EvenSplit(H200).choose(call, GPUS[0], GPUS[:3], nvlink, unlimited)
    assert choice.split and [s.heads for s in choice.shares] == [7, 7, 6]
    assert choice.prediction.gain < 1.0


def test_traffic_counts_inputs_outputs_and_per_head_masks():
    call = by_key("flux_1024").signature()  # 1 x 24 x 4608 x 128, bf16
    share = Share(GPUS[1], 0, 12, 1)
    traffic = Traffic(call)
    assert traffic.bytes_in(share) == 3 * 12 * 4608 * 128 * 2
    assert traffic.bytes_out(share) == 12 * 4608 * 128 * 2
    import dataclasses
    masked = Traffic(dataclasses.replace(call, mask_kind=MASK_ADDITIVE, mask_shape=(1, 24, 4608, 4608)))
    assert masked.bytes_in(share) - traffic.bytes_in(share) == 12 * 4608 * 4608 * 2
    padding = Traffic(dataclasses.replace(call, mask_kind=MASK_BOOL, mask_shape=(1, 1, 1, 4608)))
    assert padding.bytes_in(share) - traffic.bytes_in(share) == 4608


@pytest.mark.parametrize("units,weights,expected", [
    (40, [1, 1], [20, 20]), (40, [1, 1, 1], [14, 13, 13]), (5, [1, 1, 1, 1], [2, 1, 1, 1]),
    (3, [1, 1, 1, 1], [1, 1, 1, 0]), (10, [2, 1, 1], [5, 3, 2]), (0, [1, 1], [0, 0])])
def test_apportion(units, weights, expected):
    assert apportion(units, weights) == expected


def test_link_times():
    assert SAME.ms(1e12) == 0.0 and math.isinf(SAME.gbps)
    assert NVLINK.ms(370e6) == pytest.approx(1.0)
    assert NVLINK.to_json() == {"kind": PEER, "gbps": 370.0, "source": "test"}


# As nvidia-smi prints it: a tab-separated matrix with an underlined (ANSI) header.
TOPOLOGY = (
    "\t\x1b[4mGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
    "GPU0\t X \tNV18\tNV18\tSYS\tPXB\t0-47\t0\t\tN/A\n"
    "GPU1\tNV18\t X \tNV18\tSYS\tPXB\t0-47\t0\t\tN/A\n"
    "GPU2\tNV18\tNV18\t X \tPHB\tSYS\t48-95\t1\t\tN/A\n"
    "GPU3\tSYS\tSYS\tPHB\t X \tSYS\t48-95\t1\t\tN/A\n"
    "NIC0\tPXB\tPXB\tSYS\tSYS\t X \n"
    "\n"
    "Legend:\n\n"
    "  X    = Self\n"
    "  NV#  = Connection traversing a bonded set of # NVLinks\n")


def test_topology_matrix_is_read():
    links = parse_topology(TOPOLOGY)
    assert links[(0, 1)] == "NV18" and links[(1, 2)] == "NV18"
    assert links[(0, 3)] == "SYS" and links[(2, 3)] == "PHB"
    assert (0, 0) not in links and len(links) == 12


def test_topology_with_spaces_is_read():
    text = "        GPU0    GPU1    CPU Affinity\nGPU0     X      NV4     0-15\nGPU1    NV4      X      0-15\n"
    assert parse_topology(text) == {(0, 1): "NV4", (1, 0): "NV4"}


def test_no_topology_text_is_no_links():
    assert parse_topology("") == {}
    assert parse_topology("NVIDIA-SMI has failed because it couldn't communicate with the driver.") == {}


def test_a_share_is_the_call_with_fewer_heads_on_its_device():
    import dataclasses
    call = dataclasses.replace(by_key("wan_720p").signature(), heads_kv=8, mask_kind=MASK_ADDITIVE,
                               mask_shape=(1, 40, 75600, 75600))
    share = share_call(call, 10, torch.device("cpu"))
    assert (share.heads_q, share.heads_kv, share.mask_shape) == (10, 2, (1, 10, 75600, 75600))
    assert share.device_type == "cpu" and share.compute_capability is None
    padding = share_call(dataclasses.replace(call, mask_shape=(1, 1, 1, 75600)), 10, torch.device("cpu"))
    assert padding.mask_shape == (1, 1, 1, 75600)


def test_kernel_time_falls_back_to_the_throughput_table():
    """Without a fitted model for the device class (a CPU here) the table answers."""
    call = by_key("flux_1024").signature("cpu", None, torch.float32)
    assert predicted_kernel_ms(call, 12, torch.device("cpu")) == pytest.approx(
        Traffic(call).flops(12) / (0.5 * 1e9))


def test_a_fitted_kernel_model_sets_the_kernel_time(monkeypatch):
    from attention import cost_store

    class Fitted:
        kernels = {"sdpa": None, "sage": None}

        def predictions(self, call, names, copying=frozenset()):
            return {name: 1000.0 * call.heads_q for name in names}
    monkeypatch.setattr(cost_store, "model_for", lambda device_type, capability: Fitted())
    call = by_key("flux_1024").signature("cpu", None, torch.float32)
    assert predicted_kernel_ms(call, 12, torch.device("cpu")) == pytest.approx(12.0)  # sdpa: sage is not here
