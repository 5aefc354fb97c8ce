"""Coupling across the test hosts (docs/test-hosts.md) on the multi-node Slurm cluster: the
hosts share the state directory (as a cluster's /home) but not /tmp or /dev/shm, where each
application server keeps its field store; every connection beyond loopback is mutual TLS
with certificates from ``gridcouple certs``.

- fields by reference between hosts: only the chunks asked for travel (counted by the
  producer's server), through zarr, dask and xarray too; a producer that has gone is named
  in one line;
- a server on a host whose firewall drops every inbound TCP connection still couples;
- a host that vanishes mid-step (no FIN) is reported within 10 s; a coupler that vanishes
  leaves no server running;
- ``gridcouple run thermo-mechanical`` puts its servers on two hosts, the temperature
  passing by reference with no shared file.

Tests that cut a host off restore it in ``finally`` (the nftables table they add in its
network namespace is deleted).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gridcouple.appkit.data import TimeStep
from gridcouple.appkit.store import FieldUnavailableError
from gridcouple.cli.certs import make_ca, make_site
from gridcouple.config import load_config
from gridcouple.coupler import AppRequest, Coupler
from gridcouple.coupler.session import ApplicationUnreachableError
from test_coupler import alive
from test_multihost_apps import CHUNK_ROWS, ROWS, values
from testhosts import Host, run_on

pytest_plugins = ["testhosts"]
pytestmark = pytest.mark.slurm

TESTS = Path(__file__).resolve().parent
GRIDCOUPLE = str(Path(sys.executable).with_name("gridcouple"))
ARRAY = "temperature/v000001/temperature"
FIREWALL = """
table inet gridcouple_test_firewall {
  chain inbound {
    type filter hook input priority -100; policy accept;
    iif lo accept
    ct state established,related accept
    ip saddr 169.254.77.1 tcp dport 6828 accept comment "slurmd, from the controller"
    meta l4proto tcp drop
  }
}
"""
VANISH = """
table inet gridcouple_test_vanish {
  chain inbound { type filter hook input priority -200; policy drop; iif lo accept; }
  chain outbound { type filter hook output priority -200; policy drop; oif lo accept; }
}
"""


def write_config(directory: Path, slurm_multi) -> Path:
    """A configuration in the shared ``directory``: the multi-node cluster as ``multi`` (any
    node) and as ``on-gc-hN`` (that node only), and a coupler on the bridge with mutual TLS
    from ``gridcouple certs``."""
    make_ca(directory / "ca")
    site = make_site(directory / "ca", "coupler", hosts=["169.254.77.1", "gc-root"])
    text = f'state_dir = "{directory / "state"}"\n[backend]\nname = "multi"\n'
    for name, directives in [("multi", []), *((f"on-{n}", [f"--nodelist={n}"])
                                              for n in slurm_multi.nodes)]:
        text += (f'[backend.{name}]\ntype = "slurm"\nslurm_conf = "{slurm_multi.slurm_conf}"\n'
                 f'partition = "{slurm_multi.partition}"\npoll_interval = 0.5\n'
                 f"extra_directives = {json.dumps(directives)}\n")
    text += (f'[coupler]\nhost = "169.254.77.1"\njoin_timeout = 60\n'
             f'tls_ca_file = "{site / "ca.pem"}"\ntls_cert = "{site / "cert.pem"}"\n'
             f'tls_key = "{site / "key.pem"}"\n')
    path = directory / "gridcouple.toml"
    path.write_text(text)
    return path


@pytest.fixture
def config(slurm_multi, shared_tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS),
                                                      os.environ.get("PYTHONPATH", "")]))
    return load_config(write_config(shared_tmp_path, slurm_multi))


def nft(host: Host, rules: str | None, table: str) -> None:
    """Load ``rules`` into ``host``'s network namespace, or (None) delete ``table``."""
    argv = ["nft", "-f", "-"] if rules else ["nft", "delete", "table", "inet", table]
    done = run_on(host, argv, input=rules, timeout=10)
    if rules is not None and done.returncode:
        pytest.skip(f"nft could not load the rules in {host.name}: {done.stderr.strip()} "
                    "(apt-get install -y nftables)")


def producer_and_consumer(coupler: Coupler, producer: tuple[str, str],
                          consumer: tuple[str, str]) -> tuple[Any, Any]:
    """A Producer and a Consumer, each (name, host), in one allocation."""
    return tuple(coupler.allocate_many([
        AppRequest(f"test_multihost_apps:{kind}", name=name, backend=f"on-{host}")
        for kind, (name, host) in (("Producer", producer), ("Consumer", consumer))]))


def stderr_of(coupler: Coupler, name: str) -> str:
    member = coupler._members[name]
    return member.backend.read_output(member.job, "stderr")


def test_only_the_chunks_asked_for_travel_between_hosts(config, testhosts):
    with Coupler(config) as coupler:
        producer, consumer = producer_and_consumer(coupler, ("producer", "gc-h1"),
                                                   ("consumer", "gc-h2"))
        assert (producer.host(), consumer.host()) == ("gc-h1", "gc-h2")
        assert coupler.where("producer").host == "gc-h1"
        ref = producer.get_field("temperature", 0.5, mode="ref")
        assert ref.producer == "producer" and ref.store_url.startswith("/dev/shm/")
        assert not os.path.exists(ref.store_url)  # gc-h1's /dev/shm: not on this machine

        def chunks() -> int:
            return producer.served()["chunks"].get(ARRAY, 0)

        expected = values()
        np.testing.assert_array_equal(producer.get_field("temperature", 0.5).values, expected)
        assert producer.served()["requests"] == 0  # a copy comes over the call's channel
        assert consumer.read_rows(ref, 8, 16) == expected[8:16].sum()
        assert chunks() == 1  # rows 8-15: the second chunk, and nothing else
        assert consumer.read_rows(ref, 20, 30) == expected[20:30].sum()
        assert chunks() == 3  # two more: rows 16-23 and 24-31
        assert consumer.dask_rows(ref, 0, CHUNK_ROWS) == expected[:CHUNK_ROWS].sum()
        assert chunks() == 4
        assert consumer.xarray_rows(ref, 40, 41) == expected[40].sum()
        assert chunks() == 5
        before = producer.served()["bytes"]
        assert consumer.read_all(ref) == expected.sum()
        assert chunks() == 5 + ROWS // CHUNK_ROWS
        sent = producer.served()["bytes"] - before  # the values and the array's metadata
        assert expected.nbytes < sent < expected.nbytes + 2048
        np.testing.assert_array_equal(ref.open()[96:104], expected[96:104])  # the coupler
        assert chunks() == 6 + ROWS // CHUNK_ROWS
        assert "reading the fields of producer on gc-h1 through its server" in \
            stderr_of(coupler, "consumer")


def test_a_producer_that_has_gone_is_named_in_one_line(config, testhosts):
    with Coupler(config) as coupler:
        producer, consumer = producer_and_consumer(coupler, ("producer", "gc-h1"),
                                                   ("consumer", "gc-h2"))
        ref = producer.get_field("temperature", 0.5, mode="ref")
        assert consumer.read_rows(ref, 0, 8) == values()[:8].sum()
        os.kill(producer.pid(), signal.SIGKILL)  # pids are the machine's; gc-h1 is a netns
        seconds, kind, message = consumer.timed_read(ref)
        assert kind == "FieldUnavailableError" and seconds < 5, (seconds, kind, message)
        assert "\n" not in message and "producer on gc-h1" in message, message
        started = time.monotonic()
        with pytest.raises(FieldUnavailableError) as failure:
            ref.read()  # in the coupler: it knows, or learns when it asks for a connection
        assert time.monotonic() - started < 5
        text = str(failure.value)
        assert "\n" not in text and "producer on gc-h1" in text and "has gone" in text


def test_a_server_behind_a_firewall_that_drops_inbound_tcp_still_couples(config, testhosts):
    walled = testhosts["gc-h3"]
    nft(walled, FIREWALL, "gridcouple_test_firewall")
    try:
        with Coupler(config) as coupler:
            producer, consumer = producer_and_consumer(coupler, ("walled", "gc-h3"),
                                                       ("open", "gc-h1"))
            assert producer.host() == "gc-h3"  # calls come over the connection it dialled
            port = coupler.where("walled").endpoint.rsplit(":", 1)[1]
            probe = subprocess.run(
                [sys.executable, "-c", "import socket,sys; socket.create_connection("
                 f"('{walled.address}', {port}), timeout=1)"], capture_output=True, text=True,
                timeout=10)
            assert "timed out" in probe.stderr  # the firewall drops it: nothing listens for us
            ref = producer.get_field("temperature", 0.5, mode="ref")
            assert consumer.read_all(ref) == values().sum()  # relayed by the coupler
            assert consumer.read_rows(ref, 8, 16) == values()[8:16].sum()
            np.testing.assert_array_equal(ref.read(), values())  # dialled back for us
            assert producer.served()["chunks"][ARRAY] == 2 * ROWS // CHUNK_ROWS + 1
            assert "reading its fields through the coupler" in stderr_of(coupler, "open")
    finally:
        nft(walled, None, "gridcouple_test_firewall")


def test_a_host_that_vanishes_mid_step_is_named_within_10_s(config, testhosts):
    lost = testhosts["gc-h3"]
    with Coupler(config) as coupler:
        producer, consumer = producer_and_consumer(coupler, ("doomed", "gc-h3"),
                                                   ("reader", "gc-h1"))
        ref = producer.get_field("temperature", 0.5, mode="ref")
        assert consumer.read_rows(ref, 0, 8) == values()[:8].sum()
        pid = producer.pid()
        cut: list[float] = []

        def vanish() -> None:
            nft(lost, VANISH, "gridcouple_test_vanish")  # no packet in or out: no FIN
            cut.append(time.monotonic())
            os.kill(pid, signal.SIGKILL)

        try:
            threading.Timer(1.0, vanish).start()
            with pytest.raises(ApplicationUnreachableError) as failure:
                producer.solve_step(TimeStep(60.0, 60.0, 1))
            assert time.monotonic() - cut[0] < 10
            message = str(failure.value)
            assert message.startswith("application doomed (test_multihost_apps:Producer)")
            assert "unreachable on gc-h3 (no heartbeat for" in message
            seconds, kind, text = consumer.timed_read(ref)  # a reader is told, not hung
            assert kind == "FieldUnavailableError" and seconds < 12, (seconds, kind, text)
        finally:
            nft(lost, None, "gridcouple_test_vanish")


COUPLER_SCRIPT = """
import json, sys, time
from gridcouple.config import load_config
from gridcouple.coupler import AppRequest, Coupler
coupler = Coupler(load_config(sys.argv[1]))
coupler.coupler_silence = 3.0
with coupler:
    apps = coupler.allocate_many([AppRequest("test_multihost_apps:Producer", name="a",
                                             backend="on-gc-h1"),
                                  AppRequest("test_multihost_apps:Producer", name="b",
                                             backend="on-gc-h2")])
    print(json.dumps([[app.host(), app.pid()] for app in apps]), flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_coupler_that_vanishes_leaves_no_server_running(config, testhosts, how):
    """Killed: its connections close and the servers end at once. Frozen (SIGSTOP: no FIN,
    no pings): the servers end after its silence (3 s here)."""
    coupler = subprocess.Popen([sys.executable, "-c", textwrap.dedent(COUPLER_SCRIPT),
                                str(config.path)], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        line = coupler.stdout.readline()
        assert line, "the coupler did not start its servers"
        servers = json.loads(line)
        assert sorted(host for host, _ in servers) == ["gc-h1", "gc-h2"]
        os.kill(coupler.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        deadline = time.monotonic() + (5 if how == "killed" else 10)
        while any(alive(pid) for _, pid in servers):
            assert time.monotonic() < deadline, f"servers still running: {servers}"
            time.sleep(0.1)
    finally:
        os.killpg(coupler.pid, signal.SIGKILL)
        coupler.wait(10)


def test_thermo_mechanical_on_two_hosts_passes_the_temperature_by_reference(
        slurm_multi, shared_tmp_path):
    """``gridcouple run thermo-mechanical --backend multi``: the two servers land on two
    nodes (least loaded first); the expansion solver reads each step's temperature through
    the heat solver's server, and no field store appears in the shared directory."""
    config = write_config(shared_tmp_path, slurm_multi)
    stores: set[str] = set()
    done = threading.Event()

    def watch_shared() -> None:  # a field store in the shared directory, at any moment
        while not done.is_set():
            stores.update(str(p) for p in shared_tmp_path.rglob("zarr.json"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_shared)
    watcher.start()
    try:
        run = subprocess.run([GRIDCOUPLE, "run", "thermo-mechanical", "--config", str(config),
                              "--backend", "multi", "--out", str(shared_tmp_path / "out")],
                             capture_output=True, text=True, timeout=180)
    finally:
        done.set()
        watcher.join()
    assert run.returncode == 0, run.stderr
    assert "9 VTK files" in run.stdout
    jobs = json.loads(subprocess.run(
        [GRIDCOUPLE, "status", "--all", "--json", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=True).stdout)
    hosts = {job["name"]: job["host"] for job in jobs}
    assert set(hosts) == {"heat", "expansion"} and hosts["heat"] != hosts["expansion"], hosts
    assert stores == set()
    home = {job["name"]: shared_tmp_path / "state" / "jobs" / str(job["id"]) for job in jobs}
    expansion = (home["expansion"] / "stderr").read_text()
    assert f"reading the fields of heat on {hosts['heat']} through its server" in expansion
    heat = (home["heat"] / "stderr").read_text()
    assert "heat: served" in heat and "field reads to other applications (9 chunks" in heat
