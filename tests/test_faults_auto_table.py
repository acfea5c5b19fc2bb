"""Fault suite, CPU: a bad ATTENTION_BACKENDS_AUTO file (missing, truncated, wrong
shape, unknown backend) costs the user one warning naming the variable and the file,
and `auto` keeps the built-in table; a good one is read once per change of the file."""

from __future__ import annotations

import json
import logging
import os

import pytest

from attention import Dispatcher, priority
from attention.priority import AUTO_TABLE, ENV_TABLE, load_table
from attention.status import machine_status

GOOD = {"default": [{"backend": "sdpa_math", "min_tokens": 16}]}

BAD = {
    "truncated": '{"default": [{"backend": "sdpa_ma',
    "not an object": "[1, 2]",
    "rows not a list": '{"default": {"backend": "sdpa"}}',
    "row not an object": '{"default": ["sdpa"]}',
    "no backend": '{"default": [{"min_tokens": 4}]}',
    "unknown backend": '{"default": [{"backend": "flash5"}]}',
    "min_tokens not a number": '{"default": [{"backend": "sdpa", "min_tokens": "many"}]}',
    "head_dims not numbers": '{"default": [{"backend": "sdpa", "head_dims": ["x"]}]}',
    "head_dims not a list": '{"default": [{"backend": "sdpa", "head_dims": 128}]}',
    "nested 100000 deep": "[" * 100_000 + "]" * 100_000,
    "utf-16": "{}".encode("utf-16"),
}


@pytest.fixture(autouse=True)
def _fresh_cache():
    priority.forget_loaded_table()
    yield
    priority.forget_loaded_table()


def _write(path, content) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_table_warns_once_naming_variable_and_file_and_auto_keeps_working(tmp_path, monkeypatch, caplog,
                                                                                  case):
    path = _write(tmp_path / "table.json", BAD[case])
    monkeypatch.setenv(ENV_TABLE, path)
    with caplog.at_level(logging.WARNING, logger="attention"):
        for _ in range(3):  # node executions and status requests
            assert load_table() == AUTO_TABLE
        assert Dispatcher("sdpa")(*_qkv(), 2).shape == (1, 8, 32)
        assert Dispatcher("auto").plan_for(_call()).name == "sdpa"
        machine_status()  # the status route
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert ENV_TABLE in warnings[0] and path in warnings[0] and "built-in" in warnings[0]


def test_a_missing_table_file_warns_once(tmp_path, monkeypatch, caplog):
    path = str(tmp_path / "no-such-table.json")
    monkeypatch.setenv(ENV_TABLE, path)
    with caplog.at_level(logging.WARNING, logger="attention"):
        assert load_table() == AUTO_TABLE
        assert load_table() == AUTO_TABLE
        Dispatcher("auto").plan_for(_call())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and ENV_TABLE in warnings[0] and path in warnings[0]


def test_a_good_table_is_read_once_per_change_of_the_file(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    _write(path, json.dumps(GOOD))
    monkeypatch.setenv(ENV_TABLE, str(path))
    table = load_table()
    assert [e.backend for e in table["default"]] == ["sdpa_math", "sdpa"]
    assert table["sm90"] == AUTO_TABLE["sm90"]
    # Same size and modification time, other content: the cached table is used (not re-read).
    stat = os.stat(path)
    _write(path, json.dumps({"default": [{"backend": "sdpa_math", "min_tokens": 32}]}))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_table()["default"][0].rule.min_tokens == 16
    # A later modification is picked up.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_table()["default"][0].rule.min_tokens == 32


def test_fixing_a_bad_table_is_picked_up(tmp_path, monkeypatch, caplog):
    path = tmp_path / "table.json"
    _write(path, BAD["truncated"])
    monkeypatch.setenv(ENV_TABLE, str(path))
    assert load_table() == AUTO_TABLE
    stat = os.stat(path)
    _write(path, json.dumps(GOOD))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert [e.backend for e in load_table()["default"]] == ["sdpa_math", "sdpa"]


def test_no_variable_means_the_built_in_table(monkeypatch):
    monkeypatch.delenv(ENV_TABLE, raising=False)
    assert load_table() == AUTO_TABLE


def _qkv():
    import torch
    return tuple(torch.randn(1, 8, 32) for _ in range(3))


def _call():
    import torch
    from attention.call import CallSignature
    return CallSignature(device_type="cpu", compute_capability=None, dtype=torch.float32, batch=1, heads_q=2,
                         heads_kv=2, seq_q=8, seq_k=8, head_dim=16, head_dim_v=16)
