"""Start a job manager as a child process (for recipes, benchmarks and tests): a fresh work
root, a configuration written from a dict, tokens for some users in owner-only files, and the
URL it announces once it listens."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridcouple.errors import GridcoupleError

START_TIMEOUT = 30.0
SERVE = [sys.executable, "-c", "from gridcouple.cli import main; main()", "jobman", "serve"]


@dataclass
class LaunchedJobManager:
    """A job manager started by :func:`start_job_manager`."""

    process: subprocess.Popen[str]
    url: str
    config: Path
    work_root: Path
    tokens: dict[str, str]  # user -> token
    token_files: dict[str, Path]  # user -> owner-only file with the token
    log: Path

    def stop(self, *, cancel_jobs: bool = True) -> str:
        """Stop it (SIGTERM) and, with ``cancel_jobs``, its jobs and queue; says what it did."""
        from gridcouple.config import load_config
        from gridcouple.jobman.server import stop

        done = stop(load_config(self.config), cancel_jobs=cancel_jobs)
        self.process.wait(10)
        return done


def toml_table(name: str, values: dict[str, Any]) -> str:
    """A TOML table of strings, numbers, booleans, paths and lists of strings (JSON spells
    those as TOML does)."""
    lines = [f"{key} = {json.dumps(str(v) if isinstance(v, Path) else v)}\n"
             for key, v in values.items()]
    return f"[{name}]\n" + "".join(lines)


def launch(config: Path, log: Path, *, env: dict[str, str] | None = None,
           timeout: float = START_TIMEOUT) -> tuple[subprocess.Popen[str], str]:
    """Run ``gridcouple jobman serve --config CONFIG`` (stderr appended to ``log``) and wait for
    the URL it announces."""
    with open(log, "a") as err:
        process = subprocess.Popen([*SERVE, "--config", str(config)], stdout=subprocess.PIPE,
                                   stderr=err, text=True, env=env, start_new_session=True)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if not line:
        process.kill()
        process.wait()
        raise GridcoupleError(f"the job manager of {config} did not start within "
                              f"{timeout:g} s: {log.read_text()[-1500:]}")
    return process, json.loads(line)["url"]


def start_job_manager(directory: Path, settings: dict[str, Any],
                      users: tuple[str, ...] = ("coupler",)) -> LaunchedJobManager:
    """A job manager on loopback (any free port unless ``settings`` says) with its work root
    in ``directory``, its ``[jobmanager]`` table from ``settings`` and a token for each of
    ``users``."""
    from gridcouple.jobman.tokens import TokenStore

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    work_root = Path(settings.get("work_root") or directory / "work")
    config = directory / "jobman.toml"
    config.write_text(toml_table("jobmanager", {"port": 0, "work_root": work_root, **settings}))
    store = TokenStore(Path(settings.get("token_file") or work_root / "tokens.json"))
    tokens, token_files = {}, {}
    for user in users:
        tokens[user] = store.add(user)
        token_files[user] = directory / f"{user}.token"
        fd = os.open(token_files[user], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(tokens[user] + "\n")
    log = directory / "jobman.log"
    process, url = launch(config, log)
    return LaunchedJobManager(process, url, config, work_root, tokens, token_files, log)
