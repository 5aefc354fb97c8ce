"""Adversarial configuration: every bad file or value is one ConfigError naming the file (and
the line and key where there is one); nothing else escapes, nothing hangs."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gridcouple.backends import check_config
from gridcouple.config import load_config
from gridcouple.errors import ConfigError

# Every float option of the built-in sections and backends that a nan or an inf would break.
FLOAT_KEYS = [("coupler", "join_timeout"), ("coupler", "call_timeout"),
              ("backend.local", "grace_period"), ("backend.local", "idle_exit"),
              ("backend.slurm", "poll_interval"), ("backend.slurm", "command_timeout")]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(("table", "key"), FLOAT_KEYS)
def test_a_non_finite_number_is_refused_on_its_line(tmp_path, table, key, value):
    path = tmp_path / "gridcouple.toml"
    path.write_text(f"# a comment\n[{table}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as error:
        check_config(load_config(path))
    assert str(error.value) == (f"{path}:3: [{table}] {key}: expected a finite number, got "
                                f"{float(value)!r}")


@pytest.mark.parametrize("port", [-1, 65536, 99999])
def test_a_port_out_of_range_is_refused(tmp_path, port):
    path = tmp_path / "gridcouple.toml"
    path.write_text(f"[coupler]\nport = {port}\n")
    with pytest.raises(ConfigError, match=rf":2: \[coupler\] port: must be a TCP port, 0 "
                                          rf".any free one. to 65535, got {port}"):
        load_config(path)


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "gridcouple.toml"
    path.write_bytes(b'[backend]\nname = "loc\xe9l"\n')
    with pytest.raises(ConfigError, match=r"gridcouple.toml:2: not UTF-8 text \(byte 0xe9\); "
                                          "TOML files are UTF-8"):
        load_config(path)


def test_a_policy_module_with_a_syntax_error_is_one_error(tmp_path, monkeypatch):
    (tmp_path / "brokenpolicy.py").write_text("def select(:\n")
    (tmp_path / "raisingpolicy.py").write_text("raise RuntimeError('no licence server')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module, why in (("brokenpolicy", "SyntaxError: invalid syntax"),
                        ("raisingpolicy", "RuntimeError: no licence server")):
        path = tmp_path / "gridcouple.toml"
        path.write_text(f'[backend.local]\npolicy = "{module}:Mine"\n')
        with pytest.raises(ConfigError) as error:
            check_config(load_config(path))
        assert f"{path}:2: [backend.local] policy: policy '{module}:Mine' cannot be imported: " \
               f"{why}" in str(error.value)


def test_config_check_on_the_command_line_prints_one_line_for_a_broken_policy(tmp_path):
    (tmp_path / "brokenpolicy.py").write_text("def select(:\n")
    (tmp_path / "gridcouple.toml").write_text('[backend.local]\npolicy = "brokenpolicy:Mine"\n')
    proc = subprocess.run([sys.executable, "-c", "from gridcouple.cli import main; main()",
                           "config", "check"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "SyntaxError" in proc.stderr


TOML_PIECES = st.sampled_from([
    "[backend]", "[backend.local]", "[backend.slurm]", "[coupler]", "[backend.x]", "[[a]]",
    'name = "local"', 'type = "local"', "slots = 2", "slots = -1", "slots = 1e999",
    "port = 70000", "join_timeout = nan", 'state_dir = "s"', "state_dir = 3", "python = []",
    'policy = "fcfs"', 'policy = "x:y"', "grace_period = inf", "host = '::1'", "=", "[",
    '"\\u0000" = 1', "a.b.c = 1", "poll_interval = 0", 'bin_dir = "/nonexistent"',
])


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(TOML_PIECES, st.text(max_size=20)), max_size=8))
def test_fuzzed_files_give_a_config_error_or_a_config(tmp_path, lines):
    path = tmp_path / "gridcouple.toml"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
    try:
        config = load_config(path)
        check_config(config)
    except ConfigError as exc:
        assert str(exc).startswith((str(path), "$GRIDCOUPLE_BACKEND", "<defaults>",
                                    "config file")), exc
    else:
        coupler = config.section("coupler")
        assert math.isfinite(coupler.join_timeout) and 0 <= coupler.port <= 65535
