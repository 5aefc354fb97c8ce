"""Bad input and attacks against a real job manager: strangers, wrong and revoked tokens,
ACL-denied addresses, path traversal, oversized bodies, malformed JSON, a slow client, a flood
of idle connections, and a bounded fuzz of random requests. Every refusal must be one clear
JSON error, logged with the client's address, and must run nothing."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import socket
import string
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from gridcouple.journal import Journal
from test_jobman_helpers import (
    GRIDCOUPLE,
    assert_refused,
    closes_within,
    job_states,
    start_jobman,
    wait_for,
    wait_states,
)

MAX_BODY, MAX_UPLOAD, MAX_CONNECTIONS, IDLE = 8192, 65536, 64, 1.5
FUZZ_REQUESTS = int(os.environ.get("GRIDCOUPLE_FUZZ_REQUESTS", "10000"))


@pytest.fixture(scope="module")
def jm(tmp_path_factory):
    """One job manager for the module: small limits; 127.0.0.2 is denied by the ACL."""
    directory = tmp_path_factory.mktemp("attacks")
    jobman = start_jobman(directory, commands=["true", "sh"], max_jobs=2, max_queued=20,
                          max_body=MAX_BODY, max_upload=MAX_UPLOAD,
                          max_connections=MAX_CONNECTIONS, idle_timeout=IDLE,
                          acl=["deny 127.0.0.2/32", "allow 127.0.0.0/8"])
    (directory / "canary").write_text("outside every job")
    yield jobman
    jobman.cleanup()


@pytest.fixture(scope="module")
def job(jm):
    """A finished job of alice's with a file and a symlink pointing out of its directory."""
    answer = jm.client().call("POST", "/jobs", {"jobs": [{"argv": [
        "sh", "-c", "echo data > inside.txt; mkdir sub; ln -s / root; ln -s ../.. up"]}]})
    job_id = answer["jobs"][0]["id"]
    wait_states(jm, [job_id], {"completed"})
    return job_id


def jobs_in_journal(jm) -> int:
    with Journal(jm.work_root / "queue" / "journal.sqlite") as journal:
        return len(journal.records())


def raw_exchange(jm, data: bytes, *, source: str = "127.0.0.1", wait: float = 3.0) -> bytes:
    """Send raw bytes on a new connection; everything the server answers until it closes (or
    ``wait`` passes)."""
    with socket.create_connection(("127.0.0.1", jm.port), timeout=wait,
                                  source_address=(source, 0)) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
            if b"\r\n\r\n" in received and _complete(received):
                break
        return received


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def parse(response: bytes) -> tuple[int, object]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, json.loads(body) if body else None


# --- who gets in ------------------------------------------------------------------------------


def test_strangers_and_wrong_tokens_are_refused_logged_and_run_nothing(jm):
    before = jobs_in_journal(jm)
    job = {"jobs": [{"argv": ["sh", "-c", "touch /tmp/gridcouple-jobman-pwned"]}]}
    wrong = {
        "no header": {},
        "unknown token": {"Authorization": "Bearer gcjm_" + "A" * 43},
        "no token": {"Authorization": "Bearer"},
        "other scheme": {"Authorization": f"Token {jm.token}"},
        "basic, wrong user": {"Authorization": "Basic " + _b64(f"bob:{jm.token}")},
        "basic, not base64": {"Authorization": "Basic !!!"},
        "a 6 KB token": {"Authorization": "Bearer gcjm_" + "x" * 6000},
        "a token of another user's form": {"Authorization": f"Bearer {jm.token[:-1]}"},
    }
    for headers in wrong.values():
        for method, path, body in (("POST", "/api/v1/jobs", job), ("GET", "/api/v1/info", None),
                                   ("GET", "/api/v1/nothing/here", None),
                                   ("GET", "/status", None)):
            message = assert_refused(jm.request(method, path, body, user=None, headers=headers),
                                     401, "bearer token is required")
            assert "nothing" not in message  # a stranger learns no endpoint
    assert jobs_in_journal(jm) == before
    assert not Path("/tmp/gridcouple-jobman-pwned").exists()
    wait_for(lambda: "refused 127.0.0.1: 401 POST /api/v1/jobs" in jm.log_text())


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def test_a_revoked_token_is_refused_from_the_next_request_on(jm):
    made = subprocess.run([GRIDCOUPLE, "jobman", "token", "add", "carol", "--config",
                           str(jm.config)], capture_output=True, text=True, timeout=30)
    token = made.stdout.strip()
    headers = {"Authorization": f"Bearer {token}"}
    assert jm.request("GET", "/api/v1/info", user=None, headers=headers)[1]["user"] == "carol"
    revoked = subprocess.run([GRIDCOUPLE, "jobman", "token", "revoke", "carol", "--config",
                              str(jm.config)], capture_output=True, text=True, timeout=30)
    assert revoked.returncode == 0
    assert_refused(jm.request("GET", "/api/v1/info", user=None, headers=headers), 401)
    assert_refused(jm.request("POST", "/api/v1/jobs", {"jobs": [{"argv": ["true"]}]},
                              user=None, headers=headers), 401)


def test_an_address_the_acl_denies_is_refused_even_with_a_valid_token(jm):
    before = jobs_in_journal(jm)
    body = json.dumps({"jobs": [{"argv": ["true"]}]}).encode()
    request = (b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
               + jm.token.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
               + b"\r\n\r\n" + body)
    status, answer = parse(raw_exchange(jm, request, source="127.0.0.2"))
    assert_refused((status, answer), 403, "address 127.0.0.2 is not allowed",
                   "rule 'deny 127.0.0.2/32'")
    assert parse(raw_exchange(jm, request, source="127.0.0.3"))[0] == 201  # the next rule
    assert jobs_in_journal(jm) == before + 1
    wait_for(lambda: "refused 127.0.0.2: 403" in jm.log_text())


# --- paths ------------------------------------------------------------------------------------

TRAVERSALS = ["..", "../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2E%2E/%2E%2E/canary",
              "/etc/passwd", "%2Fetc%2Fpasswd", "sub/../../canary", "sub/./x", ".", "a//b",
              "sub%00/x", "a%5C..%5C..%5Ccanary", "root/etc/passwd", "root/tmp/x",
              "up/canary", "up/../canary", "x" * 300, "%ED%A0%80"]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_in_every_file_operation_is_refused(jm, job, path):
    """GET, PUT, DELETE and listing, in a job's directory and an upload: each refused with
    one clear error; nothing outside changes."""
    canary = jm.work_root.parent / "canary"
    base = f"/api/v1/jobs/{job}/files"
    upload = jm.request("POST", "/api/v1/uploads")[1]["upload"]
    attempts = [("GET", f"{base}/{path}", None), ("PUT", f"{base}/{path}", b"x"),
                ("DELETE", f"{base}/{path}", None), ("GET", f"{base}?path={path}", None)]
    if path.split("/")[0] not in ("root", "up"):  # those are the job's symlinks
        attempts.append(("PUT", f"/api/v1/uploads/{upload}/files/{path}", b"x"))
    for method, url, body in attempts:
        code, answer = jm.request(method, url, body)
        assert code in (400, 404), (method, url, code, answer)
        assert isinstance(answer, dict) and set(answer) == {"error"}, (method, url, answer)
    jm.request("DELETE", f"/api/v1/uploads/{upload}")
    assert canary.read_text() == "outside every job"
    assert Path("/etc/passwd").stat().st_size > 0
    assert not Path("/tmp/x").exists() or Path("/tmp/x").stat().st_mtime < time.time() - 60


def test_job_ids_in_paths_are_refused_unless_yours(jm, job):
    for bad in ("..", "-1", "0", "1e3", "99999999999999999999", f"{job}%2F..", "%20" + str(job)):
        code, answer = jm.request("GET", f"/api/v1/jobs/{bad}/files/inside.txt")
        assert code == 404 and set(answer) == {"error"}, (bad, answer)
    assert_refused(jm.request("GET", f"/api/v1/jobs/{job}/files/inside.txt", user="bob"), 404,
                   f"no job {job} of yours")


# --- bodies -----------------------------------------------------------------------------------


def test_an_oversized_body_is_refused_from_its_headers(jm):
    head = (f"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {jm.token}\r\n"
            f"Content-Length: {10**12}\r\n\r\n").encode()
    started = time.monotonic()
    answer = raw_exchange(jm, head + b"{")  # the terabyte never comes
    assert time.monotonic() - started < 2
    assert_refused(parse(answer), 413, f"larger than the {MAX_BODY} bytes")
    chunked = (f"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {jm.token}\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n").encode()
    piece = b"2000\r\n" + b" " * 0x2000 + b"\r\n"
    assert_refused(parse(raw_exchange(jm, chunked + piece * 3)), 413)
    assert_refused(parse(raw_exchange(jm, head.replace(b"1000000000000", b"12x"))), 400,
                   "not a number")


def test_an_oversized_upload_is_refused_and_leaves_no_file(jm, job):
    code, answer = jm.request("PUT", f"/api/v1/jobs/{job}/files/big.bin",
                              b"x" * (MAX_UPLOAD + 1))
    assert_refused((code, answer), 413, f"{MAX_UPLOAD} bytes")
    upload = jm.request("POST", "/api/v1/uploads")[1]["upload"]
    assert jm.request("PUT", f"/api/v1/uploads/{upload}/files/a", b"x" * MAX_UPLOAD)[0] == 201
    assert_refused(jm.request("PUT", f"/api/v1/uploads/{upload}/files/b", b"x" * 10), 413,
                   "room for 0 more bytes")
    home = jm.work_root / "queue" / "jobs" / str(job)
    assert not any(p.name.startswith(".gcjm-partial") or p.name == "big.bin"
                   for p in home.rglob("*"))


MALFORMED = [b"{", b"\xff\xfe\x00", b"[]", b"null", b"1e999", b'{"jobs": "x"}',
             b'{"jobs": []}', b'{"jobs": [1]}', b'{"jobs": [{}]}', b'{"jobs": [{"argv": []}]}',
             b'{"jobs": [{"argv": [1, 2]}]}', b'{"jobs": [{"argv": ["true"], "x": 1}]}',
             b'{"jobs": [{"argv": ["true\\u0000"]}]}', b'{"jobs": [{"argv": ["\\ud800"]}]}',
             b'{"jobs": [{"argv": ["true"], "environment": {"GRIDCOUPLE_A": "\\ud800"}}]}',
             b'{"jobs": [{"argv": ["true"], "resources": {"walltime": NaN}}]}',
             b'{"jobs": [{"argv": ["true"], "resources": {"memory_mb": -1}}]}',
             b'{"jobs": [{"argv": ["true"], "resources": {"cpus": 1e999}}]}',
             b'{"jobs": [{"argv": ["true"], "estimate": "soon"}]}',
             b'{"jobs": [{"argv": ["true"]}], "request": ""}',
             b'{"jobs": [{"argv": ["true"]}], "upload": "../../x"}',
             b"[" * 3000 + b"]" * 3000, b'{"ids": [true]}']


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_json_and_wrong_shapes_are_one_clear_error(jm, body):
    before = jobs_in_journal(jm)
    for path in ("/api/v1/jobs", "/api/v1/jobs/status", "/api/v1/jobs/cancel"):
        code, answer = jm.request("POST", path, body)
        assert code in (400, 404), (path, code, answer)
        assert isinstance(answer, dict) and set(answer) == {"error"} and answer["error"]
    assert jobs_in_journal(jm) == before


# --- connections ------------------------------------------------------------------------------


def test_a_slow_client_does_not_block_others_and_is_closed_at_the_idle_timeout(jm):
    slow = socket.create_connection(("127.0.0.1", jm.port), timeout=5)
    trickle = b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 100
    stop = threading.Event()

    def drip() -> None:
        for byte in trickle:
            if stop.is_set():
                return
            try:
                slow.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.05)

    dripping = threading.Thread(target=drip)
    dripping.start()
    try:
        took = []
        for _ in range(20):
            started = time.monotonic()
            assert jm.request("GET", "/api/v1/info")[0] == 200
            took.append(time.monotonic() - started)
        assert max(took) < 0.5, took
        started = time.monotonic()
        assert closes_within(slow, IDLE + 3)
        assert time.monotonic() - started < IDLE + 3
    finally:
        stop.set()
        dripping.join()
        slow.close()
    assert jm.alive()


def test_a_flood_of_idle_connections_then_the_server_accepts_again(jm):
    flood = []
    try:
        for _ in range(3 * MAX_CONNECTIONS):
            flood.append(socket.create_connection(("127.0.0.1", jm.port), timeout=5))
        time.sleep(0.3)
        turned_away = []
        for sock in flood[-MAX_CONNECTIONS:]:  # the last ones are over the limit
            sock.settimeout(2)
            try:
                turned_away.append(sock.recv(4096))
            except TimeoutError:
                turned_away.append(b"")
        assert all(b"503 Service Unavailable" in answer and b"its limit" in answer
                   for answer in turned_away), turned_away[:2]
        # Nobody closes the flood: the server drops idle connections itself.
        time.sleep(IDLE + 1)
        assert jm.request("GET", "/api/v1/info")[0] == 200
    finally:
        for sock in flood:
            sock.close()
    for _ in range(5):
        assert jm.request("GET", "/api/v1/info")[0] == 200
    assert jm.alive()


# --- fuzz -------------------------------------------------------------------------------------


def test_a_bounded_fuzz_of_random_requests_crashes_nothing_and_leaks_nothing(jm, job):
    """FUZZ_REQUESTS random requests (methods, paths, headers, JSON and raw bodies, bytes that
    are not HTTP) from 4 threads; afterwards the server still serves, logged no internal
    error, left no partial file, kept its descriptors, and wrote nothing outside its root."""
    server_fds = len(os.listdir(f"/proc/{jm.process.pid}/fd"))
    outside_before = sorted(p.name for p in jm.work_root.parent.iterdir())
    statuses: dict[int, int] = {}
    problems: list[str] = []
    lock = threading.Lock()

    def worker(seed: int, count: int) -> None:
        rng = random.Random(seed)
        connection = jm.raw(timeout=10)
        for _ in range(count):
            if rng.random() < 0.03:
                _garbage(jm, rng)
                continue
            method, path, headers, body = _random_request(rng, jm, job)
            for attempt in (1, 2):  # as a client would: once more on a new connection
                try:
                    connection.request(method, path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    break
                except (OSError, http.client.HTTPException) as exc:
                    connection.close()
                    connection = jm.raw(timeout=10)
                    if attempt == 2:
                        problems.append(f"no answer to {method} {path[:80]}: {exc!r}")
            else:
                continue
            with lock:
                statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status >= 500 and response.status != 507:
                problems.append(f"{response.status} for {method} {path[:80]}")
            elif response.status >= 400 and method != "HEAD":
                try:
                    error = json.loads(data)["error"]
                    assert isinstance(error, str) and error
                except (ValueError, KeyError, TypeError, AssertionError):
                    problems.append(f"not one clear error: {response.status} {data[:80]!r}")
            if response.will_close:
                connection.close()
                connection = jm.raw(timeout=10)
        connection.close()

    threads = [threading.Thread(target=worker, args=(seed, FUZZ_REQUESTS // 4))
               for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not problems, problems[:5]
    assert sum(statuses.values()) > 0.9 * FUZZ_REQUESTS, statuses
    assert jm.alive()
    log = jm.log_text()
    assert "Uncaught exception" not in log and "Traceback" not in log
    wait_for(lambda: len(os.listdir(f"/proc/{jm.process.pid}/fd")) <= server_fds + 2)
    assert not [p for p in jm.work_root.rglob(".gcjm-partial-*")]
    assert sorted(p.name for p in jm.work_root.parent.iterdir()) == outside_before
    assert (jm.work_root.parent / "canary").read_text() == "outside every job"
    client = jm.client()
    fresh = client.call("POST", "/jobs", {"jobs": [{"argv": ["true"]}]})["jobs"][0]["id"]
    for _ in range(40):  # the fuzz may have queued jobs; ours ends in its turn
        if job_states(jm, [fresh]) == ["completed"]:
            break
        time.sleep(0.25)
    assert job_states(jm, [fresh]) in (["completed"], ["queued"], ["active"])


def _random_request(rng: random.Random, jm, job: int) -> tuple[str, str, dict, bytes | None]:
    method = rng.choice(["GET", "GET", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD",
                         "OPTIONS"])
    target = rng.choice([
        "/api/v1/info", "/api/v1/jobs", "/api/v1/jobs/status", "/api/v1/jobs/cancel",
        "/api/v1/jobs/hold", "/api/v1/jobs/release", "/api/v1/jobs/signal", "/api/v1/events",
        f"/api/v1/jobs/{job}/stdout", f"/api/v1/jobs/{job}/stderr", f"/api/v1/jobs/{job}/files",
        f"/api/v1/jobs/{job}/files/{_random_path(rng)}", "/api/v1/uploads",
        f"/api/v1/uploads/{_random_text(rng, 32)}/files/{_random_path(rng)}",
        f"/api/v1/requests/{_random_text(rng, 8)}", "/api/v1/status", "/status", "/",
        f"/api/v1/{_random_path(rng)}", f"/{_random_text(rng, 20)}"])
    if rng.random() < 0.3:
        target += "?" + rng.choice(["tail=", "since=", "path=", "live="]) + \
            rng.choice(["5", "-1", "abc", "99999999999", _random_path(rng)])
    target = urllib.parse.quote(target, safe="/%?=&:@!$'()*+,;~-._")
    headers = {}
    roll = rng.random()
    if roll < 0.8:
        headers["Authorization"] = f"Bearer {jm.tokens[rng.choice(['alice', 'bob'])]}"
    elif roll < 0.9:
        headers["Authorization"] = rng.choice(["Bearer x", "Basic Og==", "Bearer " + "y" * 64])
    body = None
    if method in ("POST", "PUT", "PATCH") or rng.random() < 0.05:
        body = _random_body(rng)
    return method, target, headers, body


def _random_body(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.6:
        job = {"argv": rng.choice([["true"], ["sh", "-c", "true"], ["sleep", "1"],
                                   [_random_text(rng, 5)], 7, None]),
               rng.choice(["name", "environment", "resources", "stage_in", "stage_out",
                           "estimate", "script", "directory", "zzz"]): _random_value(rng)}
        return json.dumps(rng.choice([
            {"jobs": [job]}, {"jobs": job}, {"ids": [rng.randint(-5, 50)
                                                     for _ in range(rng.randint(0, 5))]},
            {"ids": _random_value(rng), "signal": _random_value(rng)},
            {"jobs": [job], "request": _random_value(rng), "upload": _random_value(rng)},
            _random_value(rng)])).encode()
    if roll < 0.8:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 600)))
    return _random_text(rng, rng.randint(0, 300)).encode()


def _random_value(rng: random.Random, depth: int = 0) -> object:
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice([None, True, 0, -1, 2**70, 1.5, float("1e308"), "", "x",
                           _random_text(rng, 12), "../..", "\ud800"])
    if roll < 0.65:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["cpus", "memory_mb", "walltime", "source", "target", "GRIDCOUPLE_X",
                        "PATH", _random_text(rng, 6)]): _random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def _random_text(rng: random.Random, length: int) -> str:
    alphabet = string.ascii_letters + string.digits + "%./\\-_~:@!$&'()*+,;= \t\u00e9\u4e2d"
    return "".join(rng.choice(alphabet) for _ in range(length))


def _random_path(rng: random.Random) -> str:
    parts = [rng.choice(["..", ".", "", "inside.txt", "sub", "root", "up", "%2e%2e", "%00",
                         "%2F", "stdout", _random_text(rng, 6)]) for _ in range(rng.randint(1, 4))]
    return "/".join(parts).replace(" ", "%20").replace("\t", "%09")


def _garbage(jm, rng: random.Random) -> None:
    """Bytes that are not HTTP (or barely): the server answers 400 or closes."""
    data = rng.choice([bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))) + b"\r\n\r\n",
                       b"GET / HTTP/9.9\r\n\r\n", b"GET " + b"/" * 70000 + b" HTTP/1.1\r\n\r\n",
                       b"\x16\x03\x01\x00\xff" + b"\x00" * 50,
                       b"POST /api/v1/jobs HTTP/1.1\r\nContent-Length: -5\r\n\r\n"])
    with contextlib.suppress(OSError):
        raw_exchange(jm, data, wait=0.3)
