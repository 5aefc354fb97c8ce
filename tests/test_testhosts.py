"""The test hosts of scripts/testhosts-up and the multi-node Slurm cluster of
scripts/slurm-multi-up behave like separate machines: own hostnames and addresses, names that
resolve everywhere, TCP between them by name, private /tmp and /dev/shm, one shared directory, and
Slurm jobs that land on every node. Traffic goes only to the test hosts' addresses."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from testhosts import kill_tree, popen_on, run_on

pytest_plugins = ["testhosts"]
pytestmark = pytest.mark.timeout(120)

PY = sys.executable  # the checkout's venv: visible on every host


def python_on(host, code: str, timeout: float = 30, **kwargs) -> str:
    """Run Python ``code`` inside ``host`` and return its stdout; its failure fails the test."""
    proc = run_on(host, [PY, "-c", textwrap.dedent(code)], timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"on {host.name}: {proc.stderr}"
    return proc.stdout


def test_each_host_has_its_own_hostname_and_address(testhosts):
    assert len(testhosts) >= 3
    assert len({h.address for h in testhosts}) == len(testhosts)
    for host in testhosts:
        assert run_on(host, ["hostname"], timeout=10, check=True).stdout.strip() == host.name
        out = python_on(host, """
            import socket
            print(socket.gethostname(), socket.gethostbyname(socket.gethostname()))
        """)
        assert out.split() == [host.name, host.address]


def test_names_resolve_on_every_host_and_in_the_root_namespace(testhosts):
    expected = {h.name: h.address for h in testhosts}
    expected[testhosts.root_alias] = testhosts.root_address
    expected[testhosts.root_name] = testhosts.root_address
    for host in testhosts:
        out = python_on(host, f"""
            import json, socket
            print(json.dumps({{n: socket.gethostbyname(n) for n in {sorted(expected)!r}}}))
        """)
        assert json.loads(out) == expected, f"on {host.name}"
    for host in testhosts:
        assert socket.gethostbyname(host.name) == host.address


SERVER = """
import socket, sys
with socket.create_server(("0.0.0.0", 0)) as server:
    server.settimeout(20)
    print(server.getsockname()[1], flush=True)
    conn, peer = server.accept()
    with conn:
        conn.settimeout(20)
        data = conn.recv(100)
        conn.sendall(f"{socket.gethostname()} {peer[0]} {data.decode()}".encode())
"""

CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as conn:
    conn.sendall(socket.gethostname().encode())
    conn.settimeout(10)
    print(conn.recv(200).decode())
"""


def serve_once(host=None):
    """A one-connection TCP server on ``host`` (None: the root namespace) and its port."""
    argv = [PY, "-c", SERVER]
    proc = (popen_on(host, argv, stdout=subprocess.PIPE, text=True) if host else
            subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True))
    line = proc.stdout.readline()  # bounded: the server exits after 20 s without a connection
    assert line.strip().isdigit(), "the server did not start"
    return proc, int(line)


def test_host_reaches_a_tcp_server_on_another_host_by_name(testhosts):
    a, b = testhosts[0], testhosts[1]
    server, port = serve_once(b)
    try:
        client = run_on(a, [PY, "-c", CLIENT, b.name, str(port)], timeout=20)
        assert client.returncode == 0, client.stderr
        # b answers with its hostname and sees a's address: they are two machines.
        assert client.stdout.split() == [b.name, a.address, a.name]
        server.wait(timeout=10)
    finally:
        kill_tree(server)


def test_host_reaches_the_root_namespace_by_name(testhosts):
    host = testhosts[2]
    server, port = serve_once()
    try:
        client = run_on(host, [PY, "-c", CLIENT, testhosts.root_alias, str(port)], timeout=20)
        assert client.returncode == 0, client.stderr
        assert client.stdout.split() == [testhosts.root_name, host.address, host.name]
    finally:
        kill_tree(server)


@pytest.mark.parametrize("private", ["/tmp", "/dev/shm"])
def test_tmp_and_dev_shm_are_private_to_each_host(testhosts, private):
    a, b = testhosts[0], testhosts[1]
    name = f"{private}/gridcouple-testhosts-{uuid.uuid4().hex}"
    run_on(b, ["sh", "-c", f"echo from-b > {name}"], timeout=10, check=True)
    root_file = Path(f"{name}-root")
    root_file.write_text("from the root namespace\n")
    try:
        assert run_on(b, ["cat", name], timeout=10).stdout == "from-b\n"
        assert run_on(a, ["test", "-e", name], timeout=10).returncode == 1
        assert not Path(name).exists()
        for host in testhosts:
            assert run_on(host, ["test", "-e", str(root_file)], timeout=10).returncode == 1
    finally:
        run_on(b, ["rm", "-f", name], timeout=10)
        root_file.unlink()


def test_shared_directory_is_shared_by_every_host(testhosts, shared_tmp_path):
    a = testhosts[0]
    python_on(a, f"""
        import socket
        open({str(shared_tmp_path / "note")!r}, "w").write(socket.gethostname())
    """)
    assert (shared_tmp_path / "note").read_text() == a.name
    for host in testhosts:
        assert run_on(host, ["cat", "note"], cwd=shared_tmp_path, timeout=10).stdout == a.name


def test_the_checkouts_venv_works_inside_a_host(testhosts):
    host = testhosts[1]
    out = python_on(host, """
        import socket, gridcouple
        print(socket.gethostname(), gridcouple.__name__)
    """)
    assert out.split() == [host.name, "gridcouple"]
    help_text = run_on(host, [PY, "-m", "gridcouple.appkit.server", "--help"], timeout=60)
    assert help_text.returncode == 0 and "--app" in help_text.stdout, help_text.stderr


# --- the multi-node Slurm cluster -------------------------------------------------------------


@pytest.mark.slurm
def test_srun_runs_on_every_node(slurm_multi, shared_tmp_path):
    n = len(slurm_multi.nodes)
    proc = subprocess.run(["srun", f"-N{n}", f"--chdir={shared_tmp_path}", "hostname"],
                          env=slurm_multi.env, cwd=shared_tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(slurm_multi.nodes)


@pytest.mark.slurm
def test_job_array_lands_on_every_node_and_writes_to_the_shared_directory(
        slurm_multi, testhosts, shared_tmp_path):
    tasks = len(slurm_multi.nodes) + 1
    # Each task leaves a file in its /tmp, then lists the tasks' files it can see there.
    script = textwrap.dedent("""\
        #!/bin/sh
        mark=/tmp/gridcouple-array-$SLURM_ARRAY_JOB_ID
        touch $mark-$SLURM_ARRAY_TASK_ID
        sleep 1
        seen=$(cd /tmp && ls gridcouple-array-$SLURM_ARRAY_JOB_ID-* | sed 's/.*-//' | tr '\\n' ' ')
        echo "$(hostname) $SLURMD_NODENAME $(hostname -i) $seen" > result-$SLURM_ARRAY_TASK_ID.part
        mv result-$SLURM_ARRAY_TASK_ID.part result-$SLURM_ARRAY_TASK_ID.txt
        sleep 1
        rm -f $mark-$SLURM_ARRAY_TASK_ID
        """)
    (shared_tmp_path / "task.sh").write_text(script)
    submit = subprocess.run(["sbatch", "--parsable", f"--array=0-{tasks - 1}", "--job-name=spread",
                             f"--chdir={shared_tmp_path}", "--output=task-%a.out", "task.sh"],
                            env=slurm_multi.env, cwd=shared_tmp_path, capture_output=True,
                            text=True, timeout=10)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    results = [shared_tmp_path / f"result-{i}.txt" for i in range(tasks)]
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in results) and time.monotonic() < deadline:
            time.sleep(0.2)
        missing = [r.name for r in results if not r.exists()]
        assert not missing, f"no result from {missing}; " + " ".join(
            p.read_text() for p in shared_tmp_path.glob("task-*.out"))
        while time.monotonic() < deadline:  # let the tasks clean their /tmp up
            queue = subprocess.run(["squeue", "-h", "-j", job, "-t", "all", "-o", "%T"],
                                   env=slurm_multi.env, capture_output=True, text=True,
                                   timeout=10)
            if set(queue.stdout.split()) <= {"COMPLETED"}:
                break
            time.sleep(0.2)
    finally:
        subprocess.run(["scancel", job], env=slurm_multi.env, capture_output=True, timeout=10)
    ran = {}
    for i, result in enumerate(results):
        hostname, nodename, address, *seen = result.read_text().split()
        assert hostname == nodename, f"task {i} ran on {nodename} with the hostname {hostname}"
        assert address == testhosts[hostname].address
        ran[i] = (hostname, {int(task) for task in seen})
    for i, (hostname, seen) in ran.items():
        # A task sees its own /tmp file, and never one of a task on another node.
        assert i in seen
        assert all(ran[other][0] == hostname for other in seen), f"task {i} saw {seen}: {ran}"
    assert sorted({hostname for hostname, _ in ran.values()}) == sorted(slurm_multi.nodes)
