"""Test support: the test hosts of scripts/testhosts-up and the multi-node Slurm cluster of
scripts/slurm-multi-up (see docs/test-hosts.md).

A test host is a network namespace on the bridge gc-br0 (169.254.77.0/24; this machine is .1,
also named gc-root) with its own hostname, /etc/hosts, /tmp and /dev/shm, held open by a holder
process; everything else (the checkout, the venv, /var/tmp, /run) is the machine's. Commands run
inside a host through ``nsenter -t HOLDER --net --uts --mount``, which needs root.

Use the fixtures by naming this module as a plugin in the test module (tests/ is on sys.path
because it has no __init__.py, as for ``from conftest import require_service``)::

    pytest_plugins = ["testhosts"]

    def test_something(testhosts, shared_tmp_path):
        a, b = testhosts[0], testhosts[1]
        server = popen_on(b, [sys.executable, "-c", "..."], stdout=subprocess.PIPE)
        run_on(a, [sys.executable, "-c", "..."], timeout=20)

    @pytest.mark.slurm
    def test_on_the_cluster(slurm_multi, shared_tmp_path):
        subprocess.run(["sbatch", ...], env=slurm_multi.env, cwd=shared_tmp_path, timeout=10)

Jobs of the multi-node cluster run inside the test hosts, so their working directory, inputs and
outputs must be in the shared directory (``shared_tmp_path``), never under /tmp.

(No asserts here, so pytest need not rewrite it: PYTEST_DONT_REWRITE.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_service

SERVICES = Path(__file__).resolve().parents[1] / ".gridcouple-services"
TESTHOSTS_RECORD = SERVICES / "testhosts.json"
SLURM_MULTI_RECORD = SERVICES / "slurm-multi.json"
PRIVATE = ("/tmp", "/dev/shm")  # per host; every other path is the machine's


@dataclass(frozen=True)
class Host:
    """One test host: its name (= hostname), address on the bridge and holder pid."""

    name: str
    address: str
    pid: int
    netns: str

    def enter(self, cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """The nsenter prefix that runs a command inside this host, in ``cwd`` (see run_on)."""
        return ["nsenter", "-t", str(self.pid), "--net", "--uts", "--mount",
                f"--wd={_workdir(cwd)}", "--"]


@dataclass(frozen=True)
class Hosts:
    """The recorded test hosts, in order (gc-h1, gc-h2, ...), and what they share."""

    hosts: tuple[Host, ...]
    shared_dir: Path      # the same directory on every host and in the root namespace
    root_name: str        # this machine's hostname; on the hosts it resolves to root_address
    root_alias: str       # "gc-root", resolvable everywhere
    root_address: str     # the root namespace's address on the bridge (169.254.77.1)
    subnet: str

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, key: int | str) -> Host:
        """A host by position or by name."""
        if isinstance(key, str):
            for host in self.hosts:
                if host.name == key:
                    return host
            raise KeyError(f"no test host named {key!r}")
        return self.hosts[key]

    @property
    def names(self) -> list[str]:
        return [host.name for host in self.hosts]


@dataclass(frozen=True)
class SlurmMulti:
    """The multi-node Slurm cluster: pass ``env`` to sbatch/srun/squeue/scancel."""

    slurm_conf: str
    partition: str
    nodes: tuple[str, ...]
    env: dict[str, str]   # os.environ with SLURM_CONF set to this cluster's
    shared_dir: Path


def _workdir(cwd: str | os.PathLike[str] | None) -> str:
    """cwd, or the current directory when it is not private to a host, else /."""
    path = os.fspath(cwd) if cwd is not None else os.getcwd()
    if cwd is None and any(path == p or path.startswith(p + "/") for p in PRIVATE):
        return "/"
    return path


def _holder_alive(pid: int, netns: str) -> str:
    """Why the holder ``pid`` of ``netns`` is not usable, or "" when it is."""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() != "sleep":
            return f"pid {pid} is not the holder of {netns}"
        if os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat(f"/run/netns/{netns}").st_ino:
            return f"pid {pid} is not in the network namespace {netns}"
    except OSError as exc:
        return f"the holder of {netns} (pid {pid}) is gone: {exc.strerror}"
    return ""


def hosts() -> tuple[Hosts | None, str]:
    """The test hosts that scripts/testhosts-up recorded, or None and why they cannot be used."""
    if not TESTHOSTS_RECORD.exists():
        return None, f"{TESTHOSTS_RECORD} is missing (start them with scripts/testhosts-up as root)"
    try:
        record = json.loads(TESTHOSTS_RECORD.read_text())
        found = tuple(Host(h["name"], h["address"], int(h["pid"]), h["netns"])
                      for h in record["hosts"])
        result = Hosts(found, Path(record["shared_dir"]), record["root"]["name"],
                       record["root"]["alias"], record["root"]["address"], record["subnet"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"cannot read {TESTHOSTS_RECORD}: {exc}"
    if os.geteuid() != 0:
        return None, "entering a test host (nsenter) needs root"
    if shutil.which("nsenter") is None:
        return None, "nsenter is not on PATH"
    for host in found:
        why = _holder_alive(host.pid, host.netns)
        if why:
            return None, f"{why} (run scripts/testhosts-up again)"
    if not result.shared_dir.is_dir():
        return None, f"the shared directory {result.shared_dir} is missing"
    return result, ""


def slurm_multi_cluster(timeout: float = 10) -> tuple[SlurmMulti | None, str]:
    """The multi-node cluster of scripts/slurm-multi-up when every node answers, or None and why."""
    found, why = hosts()
    if found is None:
        return None, why
    if not SLURM_MULTI_RECORD.exists():
        return None, f"{SLURM_MULTI_RECORD} is missing (start it with scripts/slurm-multi-up)"
    try:
        record = json.loads(SLURM_MULTI_RECORD.read_text())
        cluster = SlurmMulti(record["slurm_conf"], record["partition"], tuple(record["nodes"]),
                             {**os.environ, "SLURM_CONF": record["slurm_conf"]},
                             found.shared_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"cannot read {SLURM_MULTI_RECORD}: {exc}"
    if shutil.which("sinfo") is None:
        return None, "sinfo is not on PATH"
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-p", cluster.partition, "-o", "%N %T"],
                              env=cluster.env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"sinfo did not answer within {timeout:g} s"
    states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
    usable = {"idle", "mixed", "allocated", "completing"}
    if proc.returncode or any(states.get(node) not in usable for node in cluster.nodes):
        return None, (f"not every node of {cluster.slurm_conf} is up: "
                      f"{proc.stderr.strip() or states}")
    return cluster, ""


def _host(host: Host | str) -> Host:
    if isinstance(host, Host):
        return host
    found, why = hosts()
    if found is None:
        raise RuntimeError(f"no test hosts: {why}")
    return found[host]


def popen_on(host: Host | str, argv: Sequence[str], *,
             cwd: str | os.PathLike[str] | None = None, **kwargs) -> subprocess.Popen:
    """Start ``argv`` inside ``host`` (a Host or a name), in ``cwd`` (default: the current
    directory, or / when that is private); other arguments go to subprocess.Popen. The process
    leads a new session unless start_new_session=False, so ``kill_tree`` ends it with its
    children. The caller waits for it, with a timeout."""
    kwargs.setdefault("start_new_session", True)
    return subprocess.Popen([*_host(host).enter(cwd), *argv], **kwargs)


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a process from popen_on and its session's process group, and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait(timeout=10)


def run_on(host: Host | str, argv: Sequence[str], *, timeout: float = 30,
           cwd: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
           input: str | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``host`` and return it completed, with text stdout and stderr. After
    ``timeout`` seconds its whole process group is killed and subprocess.TimeoutExpired raised;
    with ``check``, a non-zero exit raises subprocess.CalledProcessError."""
    proc = popen_on(host, argv, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, stdin=subprocess.PIPE if input is not None else
                    subprocess.DEVNULL)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


@pytest.fixture(scope="session")
def testhosts() -> Hosts:
    """The test hosts; skips (fails with CI=true) when they are not up."""
    found, why = hosts()
    require_service("test hosts", found is not None, why)
    return found


@pytest.fixture(scope="session")
def slurm_multi(testhosts) -> SlurmMulti:
    """The multi-node Slurm cluster; skips (fails with CI=true) when it is not up."""
    cluster, why = slurm_multi_cluster()
    require_service("multi-node slurm", cluster is not None, why)
    return cluster


@pytest.fixture
def shared_tmp_path(testhosts, request) -> Iterator[Path]:
    """A fresh directory in the shared directory, seen at the same path on every test host and in
    the root namespace; removed afterwards."""
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in request.node.name)[:60]
    path = testhosts.shared_dir / f"{name}-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o777)
    path.chmod(0o777)  # jobs may run as another user
    yield path
    shutil.rmtree(path, ignore_errors=True)
