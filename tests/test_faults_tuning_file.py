"""Fault suite, CPU: the tuning file as users and other programs leave it (damaged,
re-encoded, huge) and how it is written (bounded, once per run, atomically).

Each test says what a user must see: the run goes on, one warning, the bad file moved
aside so that a restart starts clean, and a file that stays small."""

from __future__ import annotations

import datetime
import json
import logging
import os
import random

import pytest
import torch

from attention import tuning_store
from attention.call import CallSignature
from attention.tuning import MEASURED, SAVED, Limits, Measurement, Tuner, signature_key
from attention.tuning_store import (FORMAT, VERSION, InvalidTuningFile, TuningStore, forget_loaded_stores,
                                    parse, store_for)

MACHINE = {"gpu": "GPU A", "capability": "9.0", "driver": "1", "torch": "2", "cuda": "13.0", "cudnn": "9",
           "packages": {}}
CALL = CallSignature(device_type="cpu", compute_capability=None, dtype=torch.float32, batch=2, heads_q=4,
                     heads_kv=4, seq_q=64, seq_k=64, head_dim=16, head_dim_v=16)
RUNS = {"sdpa": lambda *a: None, "flash4": lambda *a: None}
GOOD = {"rel_l1": 0.001, "cosine": 0.999999, "max_abs": 0.01, "nonfinite": 0}
RESULTS = {"sdpa": Measurement(ms=1.0, error=dict(GOOD, rel_l1=0.0)), "flash4": Measurement(ms=0.7, error=GOOD)}

DAMAGED = {
    # Notepad's "Unicode" save of "{}": UTF-16 with a byte order mark.
    "utf-16": "{}".encode("utf-16"),
    "latin-1": '{"format": "comfyui-attention-backends/tuning", "note": "réglé"}'.encode("latin-1"),
    "random bytes": random.Random(13).randbytes(4096),
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "object nested 100000 deep": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "empty": b"",
}


@pytest.fixture(autouse=True)
def _fresh_stores():
    forget_loaded_stores()
    yield
    forget_loaded_stores()


class FakeMeasure:
    def __init__(self) -> None:
        self.now = 0.0
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def __call__(self, call, tensors, runs, reference, limits, seconds_left, repeat=None):
        self.calls += 1
        self.now += 0.5
        return {name: RESULTS[name] for name in runs}


def tensors():
    q = torch.randn(2, 4, 64, 16)
    return (q, q, q, None, None)


def make_tuner(path, fake=None, **kwargs) -> Tuner:
    fake = fake or FakeMeasure()
    return Tuner(str(path), measure=fake, clock=fake.clock, limits=Limits(),
                 store=lambda device: store_for(str(path), device, machine=lambda d: MACHINE), **kwargs)


def decision(tuned_at: str, backend: str = "flash4") -> dict:
    return {"backend": backend, "reference": "sdpa", "tuning_ms": 1.0, "budget": {}, "tuned_at": tuned_at,
            "candidates": {"sdpa": {"ms": 1.0, "rel_l1": 0.0, "cosine": 1.0, "max_abs": 0.0, "nonfinite": 0,
                                    "verdict": "slower: 1.400x the chosen time"}}}


def key(n: int) -> str:
    return signature_key(CallSignature(device_type="cpu", compute_capability=None, dtype=torch.float32, batch=1,
                                       heads_q=4, heads_kv=4, seq_q=n, seq_k=n, head_dim=16, head_dim_v=16))


def stamp(n: int) -> str:
    """A distinct UTC time per n, later for a larger n."""
    return (datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
            + datetime.timedelta(seconds=n)).isoformat(timespec="seconds")


def file_with(machines: list[tuple[dict, int, int]]) -> dict:
    """A tuning file: for each (fingerprint, first, count), decisions first..first+count-1."""
    return {"format": FORMAT, "version": VERSION,
            "machines": [{"fingerprint": fp,
                          "decisions": {key(n): decision(stamp(n)) for n in range(first, first + count)}}
                         for fp, first, count in machines]}


# --- damaged files ----------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_parse_refuses_damaged_bytes_with_a_reason(case):
    with pytest.raises(InvalidTuningFile) as refused:
        parse(DAMAGED[case])
    assert str(refused.value)


def test_a_utf8_byte_order_mark_is_accepted():
    # Editors on Windows may add one when saving UTF-8; the content is what counts.
    text = json.dumps(file_with([(MACHINE, 0, 2)]))
    assert len(parse(b"\xef\xbb\xbf" + text.encode())[0]["decisions"]) == 2


def test_parse_names_the_encoding_problem():
    with pytest.raises(InvalidTuningFile, match="not UTF-8 text"):
        parse(DAMAGED["utf-16"])
    with pytest.raises(InvalidTuningFile, match="nested too deeply"):
        parse(DAMAGED["nested 100000 deep"])


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_a_damaged_file_never_breaks_a_run_warns_once_and_is_moved_aside(tmp_path, caplog, case):
    path = tmp_path / "tuning.json"
    path.write_bytes(DAMAGED[case])
    with caplog.at_level(logging.WARNING, logger="attention"):
        store = store_for(str(path), torch.device("cpu"), machine=lambda d: MACHINE)  # the status route
        assert store.problem and len(store) == 0
        tuner = make_tuner(path)
        first = tuner.choose(CALL, tensors(), RUNS)
        tuner.flush()  # the end of the run
    assert first.source == MEASURED and first.backend == "flash4"
    assert caplog.text.count("ignoring tuning file") == 1
    assert store.problem is None  # the file was replaced: the status route stops warning
    assert (tmp_path / "tuning.json.ignored").read_bytes() == DAMAGED[case]  # kept for the user to inspect
    # A restart reads the new file: nothing to warn about, the decision is reused.
    forget_loaded_stores()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attention"):
        again = make_tuner(path).choose(CALL, tensors(), RUNS)
    assert again.source == SAVED and "ignoring" not in caplog.text


def test_a_file_too_large_to_be_ours_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning_store, "MAX_FILE_BYTES", 1000)
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(file_with([(MACHINE, 0, 50)])))
    store = TuningStore(str(path), MACHINE)
    assert store.problem == "larger than 0 MiB" and len(store) == 0


def test_an_unreadable_path_is_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "tuning.json"
    path.mkdir()  # a directory where the file should be
    store = TuningStore(str(path), MACHINE)
    assert store.problem.startswith("cannot read") and len(store) == 0


# --- bounded --------------------------------------------------------------------------

def test_each_machine_keeps_its_newest_decisions(tmp_path):
    store = TuningStore(str(tmp_path / "tuning.json"), MACHINE, max_decisions=10)
    for n in (5, 3, 14, 0, 9, 12, 1, 7, 11, 2, 13, 4, 8, 10, 6):  # out of order
        store.put(key(n), decision(stamp(n)))
    assert len(store) == 10
    assert sorted(store.decisions()) == sorted(key(n) for n in range(5, 15))
    assert sorted(store.newest(3)) == sorted(key(n) for n in (12, 13, 14))


def test_a_large_file_is_cut_to_the_bound_on_load_and_written_back_bounded(tmp_path):
    path = tmp_path / "tuning.json"
    other = dict(MACHINE, gpu="GPU B")
    path.write_text(json.dumps(file_with([(MACHINE, 0, 5000), (other, 10_000, 300)])))
    store = TuningStore(str(path), MACHINE, max_decisions=200)
    assert len(store) == 200 and store.problem is None
    assert sorted(store.decisions()) == sorted(key(n) for n in range(4800, 5000))
    assert store.flush()  # nothing new, but the file was over its bound
    machines = {m["fingerprint"]["gpu"]: m["decisions"] for m in parse(path.read_bytes())}
    assert len(machines["GPU A"]) == 200 and len(machines["GPU B"]) == 200
    assert sorted(machines["GPU B"]) == sorted(key(n) for n in range(10_100, 10_300))
    assert not store.flush()  # written: nothing left to write


def test_the_file_keeps_the_most_recently_tuned_machines(tmp_path):
    path = tmp_path / "tuning.json"
    others = [(dict(MACHINE, driver=str(n)), n * 10, 2) for n in range(12)]
    path.write_text(json.dumps(file_with(others)))
    store = TuningStore(str(path), MACHINE, max_machines=4)
    store.put(key(1000), decision(stamp(1000)))
    store.flush()
    kept = [m["fingerprint"]["driver"] for m in parse(path.read_bytes())]
    assert sorted(kept) == ["1", "10", "11", "9"]  # this machine's, and the three newest others


# --- written once, at the end of the run, atomically ----------------------------------

def test_decisions_are_written_once_at_the_end_of_the_run_not_during_it(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(file_with([(dict(MACHINE, gpu="GPU B"), 0, 3)])))
    tuner = make_tuner(path)
    tuner.store(torch.device("cpu"))  # loaded when the node's first call arrives

    def no_file_access(path):
        raise AssertionError("the tuning file was read during sampling")

    writes = []
    real_replace = os.replace
    monkeypatch.setattr(tuning_store, "_read", no_file_access)
    monkeypatch.setattr(os, "replace", lambda src, dst: (writes.append(dst), real_replace(src, dst)))
    for n in (64, 128, 256):  # three new call shapes in one sampler run
        call = CallSignature(device_type="cpu", compute_capability=None, dtype=torch.float32, batch=2, heads_q=4,
                             heads_kv=4, seq_q=n, seq_k=n, head_dim=16, head_dim_v=16)
        assert tuner.choose(call, tensors(), RUNS).source == MEASURED
    assert writes == []
    monkeypatch.undo()  # the run ends: flushing reads the file again and writes it
    monkeypatch.setattr(os, "replace", lambda src, dst: (writes.append(dst), real_replace(src, dst)))
    tuner.flush()
    tuner.flush()  # nothing new: nothing written
    assert writes == [str(path)]
    machines = {m["fingerprint"]["gpu"]: m["decisions"] for m in parse(path.read_bytes())}
    assert len(machines["GPU A"]) == 3 and len(machines["GPU B"]) == 3


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    original = json.dumps(file_with([(MACHINE, 0, 3)]))
    path.write_text(original)
    store = TuningStore(str(path), MACHINE)
    store.put(key(99), decision(stamp(99)))

    def crash(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(OSError):
        store.flush()
    assert path.read_text() == original
    assert sorted(os.listdir(tmp_path)) == ["tuning.json"]  # no temporary file left behind
    monkeypatch.undo()
    assert store.flush() and key(99) in parse(path.read_bytes())[0]["decisions"]


def test_retune_forgets_in_memory_and_writes_at_the_end(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(file_with([(MACHINE, 0, 3)])))
    tuner = make_tuner(path, retune=True)
    assert tuner.choose(CALL, tensors(), RUNS).source == MEASURED
    assert len(parse(path.read_bytes())[0]["decisions"]) == 3  # untouched during the run
    tuner.flush()
    assert list(parse(path.read_bytes())[0]["decisions"]) == [signature_key(CALL)]


def test_decisions_left_unwritten_are_written_at_exit(tmp_path):
    path = tmp_path / "tuning.json"
    make_tuner(path).choose(CALL, tensors(), RUNS)  # a script with a Dispatcher: no run boundary
    assert not path.exists()
    tuning_store.flush_loaded_stores()  # registered with atexit
    assert signature_key(CALL) in parse(path.read_bytes())[0]["decisions"]


def test_a_linked_file_is_read_then_replaced_not_written_through(tmp_path, caplog):
    outside = tmp_path / "elsewhere" / "shared.json"
    outside.parent.mkdir()
    outside.write_text(json.dumps(file_with([(MACHINE, 0, 2)])))
    before = outside.read_bytes()
    path = tmp_path / "user" / "tuning.json"
    path.parent.mkdir()
    path.symlink_to(outside)
    store = TuningStore(str(path), MACHINE)
    assert len(store) == 2  # what the link led to is used
    store.put(key(10), decision(stamp(10)))
    with caplog.at_level(logging.WARNING, logger="attention.tuning_store"):
        assert store.flush()
    assert outside.read_bytes() == before and not path.is_symlink()
    [machine] = parse(path.read_bytes())
    assert sorted(machine["decisions"]) == sorted([key(0), key(1), key(10)])  # nothing lost
    [record] = [r for r in caplog.records if "symbolic link" in r.getMessage()]
    assert str(path) in record.getMessage() and str(outside) in record.getMessage()
