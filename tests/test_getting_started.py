"""docs/getting-started.md works exactly as printed: its shell session and its Python example
run in a fresh directory with a fresh per-user state directory, as a new user's would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gridcouple.backends.local import LocalBackend

DOC = Path(__file__).resolve().parents[1] / "docs" / "getting-started.md"


def block(section: str, language: str) -> str:
    """The first ``language`` code block below the heading ``section``."""
    text = DOC.read_text()
    start = text.index(f"\n## {section}\n")
    match = re.compile(rf"^```{language}\n(.*?)^```", re.S | re.M).search(text, start)
    assert match, f"no {language} block under {section!r} in {DOC}"
    return match.group(1)


@pytest.fixture
def newcomer(tmp_path):
    """A new user's shell: the venv's gridcouple and python first on PATH, no configuration,
    the state directory below ``tmp_path/state``, working in ``tmp_path/work``."""
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in ("GRIDCOUPLE_CONFIG", "GRIDCOUPLE_BACKEND", "PYTHONPATH"):
        env.pop(name, None)
    yield work, env
    LocalBackend(state_dir=tmp_path / "state" / "gridcouple").stop_daemon()


def shell(line: str, work: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run one line as printed; a live view (--watch) runs for a second, then gets Ctrl-C."""
    if "--watch" not in line:
        return subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=env,
                              cwd=work, timeout=120)
    with subprocess.Popen(["bash", "-c", f"exec {line}"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=work) as live:
        time.sleep(1.0)
        live.send_signal(signal.SIGINT)
        out, err = live.communicate(timeout=30)
    return subprocess.CompletedProcess(line, live.returncode, out, err)


def test_the_shell_session_and_the_python_example_work_as_printed(newcomer):
    work, env = newcomer
    outputs = {}
    for line in block("Jobs from the shell", "sh").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        result = shell(line, work, env)
        assert result.returncode == 0, f"{line}\n{result.stdout}{result.stderr}"
        outputs[line.split("#")[0].strip()] = result.stdout
    expected = {
        "gridcouple submit -J hello": "Submitted job 1 (local 1)\n",
        "gridcouple submit --array 10": "Submitted jobs 2-11, an array of 10 (local 2 to 11)\n",
        "gridcouple logs 1": f"hello from job 1 in {work}\n",
        "gridcouple logs 5": "task 3\n",
    }
    for start, text in expected.items():
        (output,) = [out for line, out in outputs.items() if line.startswith(start)]
        assert output == text, start
    (waited,) = [out for line, out in outputs.items() if line.startswith("gridcouple wait")]
    assert waited.endswith("11/11 done: 11 COMPLETED\n")
    (canceled,) = [out for line, out in outputs.items() if "--signal USR1" in line]
    assert "job 12" in canceled
    assert not [p for p in work.iterdir() if p.name != "sweep.py"]  # no .gridcouple here
    script = work / "example.py"
    script.write_text(block("Jobs from Python", "python"))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=env, cwd=work, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("solved 0\n\n")
