"""Every configuration error names the file, the key and the line."""

from __future__ import annotations

import textwrap

import pytest

from gridcouple.backends import check_config, open_backend
from gridcouple.backends.local import LocalBackend
from gridcouple.config import load_config
from gridcouple.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "gridcouple.toml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def config_error(tmp_path, text: str) -> tuple:
    """The file written from ``text`` and the ConfigError that checking it raises."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        check_config(load_config(path))
    return path, str(info.value)


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRIDCOUPLE_CONFIG", raising=False)
    monkeypatch.delenv("GRIDCOUPLE_BACKEND", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    config = load_config()
    assert config.path is None
    assert config.backend == "local"
    assert config.state_dir == tmp_path / "xdg" / "gridcouple"  # one per user (issue 15)


def test_a_full_file_is_read_and_paths_are_relative_to_it(tmp_path, monkeypatch):
    monkeypatch.delenv("GRIDCOUPLE_BACKEND", raising=False)
    path = write(tmp_path, """
        state_dir = "state"
        [backend]
        name = "local"
        [backend.local]
        slots = 3
        policy = "fcfs"
        grace_period = 2
        [coupler]
        host = "127.0.0.1"
    """)
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.state_dir == tmp_path / "state"
    backend = open_backend(config)
    try:
        assert isinstance(backend, LocalBackend)
        assert backend.options.slots == 3 and backend.options.grace_period == 2.0
    finally:
        backend.close()
    assert check_config(config) == ["local"]


def test_environment_chooses_file_and_backend(tmp_path, monkeypatch):
    path = write(tmp_path, """
        [backend]
        name = "local"
    """)
    monkeypatch.setenv("GRIDCOUPLE_CONFIG", str(path))
    monkeypatch.setenv("GRIDCOUPLE_BACKEND", "nosuch")
    config = load_config()
    assert config.path == path and config.backend == "nosuch"
    with pytest.raises(ConfigError, match=r"^\$GRIDCOUPLE_BACKEND: backend 'nosuch' is not "
                       "installed; installed: .*local"):
        check_config(config)
    monkeypatch.setenv("GRIDCOUPLE_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"gone.toml \(named by \$GRIDCOUPLE_CONFIG\) does not"):
        load_config()


def test_backend_chosen_on_the_command_line_is_named_so(tmp_path, monkeypatch):
    from gridcouple.cli import open_config

    monkeypatch.delenv("GRIDCOUPLE_BACKEND", raising=False)
    path = write(tmp_path, """
        [backend]
        name = "local"
    """)
    with pytest.raises(ConfigError, match="^--backend: backend 'pbs' is not installed"):
        check_config(open_config(path, "pbs"))


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("""
        [backend]
        name = "local"

        [backend.local]
        slots = 2
        polcy = "fcfs"
    """, ["{path}:6: [backend.local] polcy", "did you mean 'policy'"], id="unknown-key-suggests"),
    pytest.param("""
        state_dir = "s"
        colour = "blue"
    """, ["{path}:2: colour: unknown key 'colour'"], id="unknown-top-level-key"),
    pytest.param("""
        [backend.local]
        slots = "two"
    """, ["{path}:2: [backend.local] slots: expected an integer, got a string 'two'"],
        id="wrong-type-names-expected-and-got"),
    pytest.param("""
        [coupler]
        port = true
    """, ["{path}:2: [coupler] port: expected an integer"], id="bool-is-not-an-integer"),
    pytest.param("""
        [backend]
        name = "local"
        [backend.local]
        slots = -1
    """, ["{path}:4: [backend.local] slots: must be 0 (all CPUs) or more, got -1"],
        id="bad-value-names-its-line"),
    pytest.param("""
        [backend.local]
        slots = 2
        policy = "fifo"
    """, ["{path}:3: [backend.local] policy: unknown policy 'fifo'; known: conservative, easy"],
        id="unknown-policy-is-caught-by-config-check"),
    pytest.param("""
        [backend.simgrid]
        policy = "no_such_module_gc:Policy"
    """, ["{path}:2: [backend.simgrid] policy: policy 'no_such_module_gc:Policy' cannot be"],
        id="policy-that-does-not-import"),
    pytest.param("""
        backend = "local"
    """, ["{path}:1: backend: expected a table", "got a string"], id="backend-not-a-table"),
    pytest.param("""
        state_dir = 7
    """, ["{path}:1: state_dir: expected a string"], id="state-dir-not-a-string"),
    pytest.param("""
        [coupler]
        host = "127.0.0.1"
        join_timeout = -1
    """, ["{path}:3: [coupler] join_timeout: must be positive, got -1"],
        id="coupler-value-names-its-line"),
    pytest.param("""
        [backend.slurm]
        extra_directives = ["#SBATCH --exclusive"]
    """, ["{path}:2: [backend.slurm] extra_directives: '#SBATCH --exclusive' is not an sbatch"],
        id="slurm-directive"),
    pytest.param("""
        [backend]
        name = "local"
        [backend.pbs]
        queue = "long"
    """, ["{path}:3: [backend.pbs]: backend 'pbs' is not installed"],
        id="table-of-a-backend-that-is-not-installed"),
])
def test_config_errors_name_file_line_and_key(tmp_path, text, expected):
    path, message = config_error(tmp_path, text)
    for fragment in expected:
        assert fragment.format(path=path) in message


def test_backend_not_installed_names_the_line(tmp_path, monkeypatch):
    monkeypatch.delenv("GRIDCOUPLE_BACKEND", raising=False)
    path = write(tmp_path, """
        # a comment
        [backend]
        name = "pbs"
    """)
    with pytest.raises(ConfigError, match=rf"{path}:3: \[backend\] name: backend 'pbs' is not"):
        open_backend(load_config(path))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path}/nope.toml does not exist"):
        load_config(tmp_path / "nope.toml")


def test_invalid_toml_names_file_and_line(tmp_path):
    path = write(tmp_path, """
        [backend]
        name = "local
    """)
    with pytest.raises(ConfigError, match=rf"{path}: not valid TOML: .*line 2"):
        load_config(path)


def test_unknown_policy_is_refused_clearly(tmp_path):
    from gridcouple.scheduler.policies import make_policy

    with pytest.raises(ConfigError, match="unknown policy 'fifo'; known: .*fcfs"):
        make_policy("fifo")
    with pytest.raises(ConfigError, match="cannot be imported"):
        make_policy("no_such_module_gc:Policy")
