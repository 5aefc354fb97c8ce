"""The coupler as a new user meets it (issue 15): an application module beside the scenario
imports without PYTHONPATH, allocate takes an AppRequest, a start error says what to set, and
dask is quiet unless asked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from gridcouple.appkit.transport import RemoteError
from gridcouple.backends.local import LocalBackend, LocalOptions
from gridcouple.config import load_config
from gridcouple.coupler import ApplicationError, ApplicationStartError, AppRequest, Coupler

APP = textwrap.dedent('''
    import os
    from gridcouple.appkit.application import Application
    from gridcouple.appkit.data import Property

    class Where(Application):
        def get_property(self, property_id, time=None):
            with open("where.txt", "w") as out:  # relative: in the server's directory
                out.write(os.getcwd())
            return Property(1.0, property_id=property_id)

        def get_critical_time_step(self):
            return {}["missing"]
''')


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A scenario's directory holding its own application module, as the working directory,
    with no PYTHONPATH pointing at it."""
    (tmp_path / "myapps_gc15.py").write_text(APP)
    (tmp_path / "gridcouple.toml").write_text(
        'state_dir = "state"\n[backend.local]\nslots = 2\nidle_exit = 2\n'
        "[coupler]\njoin_timeout = 60\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    yield tmp_path
    LocalBackend(state_dir=tmp_path / "state").stop_daemon()


class PartnerSite(LocalBackend):
    """A site whose jobs see only the state directory, not this machine's other files."""

    shares_file_system = False


def test_a_module_beside_the_scenario_imports_and_allocate_takes_an_app_request(project):
    config = load_config(project / "gridcouple.toml")
    with Coupler(config) as coupler:
        where = coupler.allocate(AppRequest("myapps_gc15:Where", name="where"))
        where.get_property("cwd")
        assert (project / "where.txt").read_text() == str(project)  # it runs where we run
        with pytest.raises(RemoteError) as raised:
            where.get_critical_time_step()
        text = str(raised.value)  # says where it raised, in the application's own file
        assert text.startswith("where.get_critical_time_step: KeyError: 'missing'\n")
        assert re.search(r'File ".*myapps_gc15.py", line 13, in get_critical_time_step\n'
                         r'    return \{\}\["missing"\]', text), text
        with pytest.raises(ApplicationError, match=r"takes no other keyword; put name in the "):
            coupler.allocate(AppRequest("myapps_gc15:Where"), name="other")
    site = PartnerSite(LocalOptions(slots=2, idle_exit=2), state_dir=project / "state",
                       name="partner")
    with Coupler(config, backend=site) as coupler, \
            pytest.raises(ApplicationStartError) as started:
        coupler.allocate("myapps_gc15:Where")
    site.close()
    message = str(started.value)
    assert "No module named 'myapps_gc15'" in message
    assert ("The partner backend's jobs do not see this machine's files, so the coupler passes "
            "no import path. Install 'myapps_gc15' for") in message
    assert "environment={'PYTHONPATH': 'DIR'}" in message


SCENARIO = textwrap.dedent('''
    import sys
    from gridcouple.coupler import Coupler
    with Coupler.from_config(verbose=sys.argv[1] == "verbose"):
        pass
''')


@pytest.mark.parametrize(("mode", "shown"), [("quiet", False), ("verbose", True)])
def test_dask_is_quiet_unless_verbose(project, mode, shown):
    (project / "scenario.py").write_text(SCENARIO)
    result = subprocess.run([sys.executable, "scenario.py", mode], capture_output=True,
                            text=True, timeout=60, cwd=project,
                            env={**os.environ, "GRIDCOUPLE_CONFIG": "gridcouple.toml"})
    assert result.returncode == 0, result.stderr
    assert ("distributed.scheduler - INFO" in result.stderr) is shown, result.stderr
