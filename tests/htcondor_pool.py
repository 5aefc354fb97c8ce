"""Test support for the real HTCondor pool of scripts/htcondor-up (see docs/htcondor.md).

scripts/htcondor-up describes the running pool in ``.gridcouple-services/htcondor.json``;
:func:`pool_info` reads it and checks that the collector answers. The fixture ``htcondor_pool``
(session-scoped) skips the test with one line when the pool is not there (fails it with CI=true),
points the host's ``htcondor2`` bindings at the pool (CONDOR_CONFIG, then ``reload_config()``) and
gives the :class:`PoolInfo`. ``htcondor_shared_dir`` is a fresh directory in the pool's shared
directory that the job user may write. A test module uses them with::

    from htcondor_pool import htcondor_pool_fixture, htcondor_shared_dir_fixture  # noqa: F401

    def test_something(htcondor_pool, htcondor_shared_dir): ...

(pytest puts ``tests/`` on ``sys.path``, as for ``from conftest import require_service``; the
fixtures are registered under the names ``htcondor_pool`` and ``htcondor_shared_dir``.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import require_service

INFO_FILE = Path(__file__).resolve().parents[1] / ".gridcouple-services" / "htcondor.json"
START_HINT = "start it with scripts/htcondor-up (as root) or scripts/services up"


@dataclass(frozen=True)
class PoolInfo:
    """The pool scripts/htcondor-up started (the keys of htcondor.json)."""

    condor_config: str  # the client configuration for the host's bindings (CONDOR_CONFIG)
    collector: str  # host:port
    job_user: str  # jobs submitted with the token run as this user in the chroot
    job_uid: int
    uid_domain: str  # the token's identity is job_user@uid_domain
    token_file: str
    shared_dir: str  # the same path on the host and in the chroot; mode 1777
    python: str  # the interpreter jobs use (a path inside the chroot); imports the checkout
    chroot: str  # the chroot's root directory on the host
    checkout: str  # the checkout bind-mounted read-only at the same path in the chroot
    suite: str = ""
    condor_version: str = ""
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def identity(self) -> str:
        """The authenticated user that submits: ``job_user@uid_domain``."""
        return f"{self.job_user}@{self.uid_domain}"

    def in_chroot(self, path: str | os.PathLike) -> Path:
        """Where the job's absolute ``path`` is on the host (under the chroot)."""
        return Path(self.chroot) / Path(path).relative_to("/")


def pool_info(info_file: Path = INFO_FILE) -> tuple[PoolInfo | None, str]:
    """The running pool, or None and why not (file missing, bindings missing, no collector)."""
    try:
        raw = json.loads(info_file.read_text())
    except FileNotFoundError:
        return None, f"{info_file} does not exist ({START_HINT})"
    except (OSError, ValueError) as exc:
        return None, f"cannot read {info_file}: {exc}"
    try:
        info = PoolInfo(**{k: raw[k] for k in PoolInfo.__dataclass_fields__
                           if k in raw and k != "raw"}, raw=raw)
    except TypeError as exc:
        return None, f"{info_file} lacks a key: {exc}"
    try:
        import htcondor2  # noqa: F401
    except ImportError as exc:
        return None, (f"the htcondor bindings are not installed ({exc}; "
                      "pip install 'gridcouple[htcondor]')")
    host, _, port = info.collector.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as exc:
        return None, f"nothing answers at the collector {info.collector} ({exc}; {START_HINT})"
    return info, ""


def use_pool(info: PoolInfo) -> None:
    """Point the host's htcondor2 bindings (and child processes) at the pool."""
    import htcondor2

    os.environ["CONDOR_CONFIG"] = info.condor_config
    htcondor2.reload_config()


def schedd():
    """The pool's schedd, located through the collector (htcondor2.Schedd)."""
    import htcondor2

    return htcondor2.Schedd(htcondor2.Collector().locate(htcondor2.DaemonType.Schedd))


@pytest.fixture(scope="session", name="htcondor_pool")
def htcondor_pool_fixture() -> Iterator[PoolInfo]:
    """The running pool, with the host's bindings pointed at it; skips (CI=true: fails) if none."""
    info, why = pool_info()
    require_service("HTCondor pool", info is not None, why)
    assert info is not None
    before = os.environ.get("CONDOR_CONFIG")
    use_pool(info)
    import htcondor2

    try:
        htcondor2.Collector().locate(htcondor2.DaemonType.Schedd)
    except htcondor2.HTCondorException as exc:
        require_service("HTCondor pool", False,
                        f"the collector {info.collector} knows no schedd: {exc}")
    yield info
    if before is None:
        os.environ.pop("CONDOR_CONFIG", None)
    else:
        os.environ["CONDOR_CONFIG"] = before
    htcondor2.reload_config()


@pytest.fixture(name="htcondor_shared_dir")
def htcondor_shared_dir_fixture(htcondor_pool: PoolInfo) -> Iterator[Path]:
    """A fresh directory in the pool's shared directory, owned by the job user; removed after."""
    path = Path(htcondor_pool.shared_dir) / f"test-{uuid.uuid4().hex[:12]}"
    path.mkdir(mode=0o755)
    os.chown(path, htcondor_pool.job_uid, htcondor_pool.job_uid)
    yield path
    shutil.rmtree(path, ignore_errors=True)
