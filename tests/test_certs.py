"""``gridcouple certs`` and mutual TLS beyond loopback: the certificates it makes work for the
coupler and its servers (and only those its authority signed are let in), the configuration
refuses a host beyond loopback without TLS files (``config check`` too), and an application
server refuses to listen beyond loopback without TLS."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gridcouple.appkit.transport import TOKEN_ENV, tls_contexts
from gridcouple.cli.certs import CertificateError, make_ca, make_site

GRIDCOUPLE = str(Path(sys.executable).with_name("gridcouple"))
TESTS = Path(__file__).parent


def gridcouple(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRIDCOUPLE, *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def settings(site: Path) -> dict[str, str]:
    """distributed Security's keyword arguments for a site's files."""
    return {"tls_ca_file": str(site / "ca.pem"), "tls_scheduler_cert": str(site / "cert.pem"),
            "tls_scheduler_key": str(site / "key.pem"), "tls_client_cert": str(site / "cert.pem"),
            "tls_client_key": str(site / "key.pem")}


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """Mutual TLS over a socket pair: "" when both ends accept, else the server's error."""
    a, b = socket.socketpair()
    failure: list[str] = []

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as exc:
            failure.append(str(exc))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(b) as tls:
            tls.sendall(b"x")
            tls.recv(1)
    except (ssl.SSLError, OSError):
        pass
    thread.join(10)
    return failure[0] if failure else ""


def test_a_ca_and_site_certificates_for_mutual_tls(tmp_path):
    made = gridcouple("certs", "ca", "ca", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "ca" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    made = gridcouple("certs", "site", "coupler", "--ca", "ca", "--host", "169.254.77.1",
                      "--host", "login1.example.org", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    site = tmp_path / "ca" / "coupler"
    assert f'tls_cert = "{site / "cert.pem"}"' in made.stdout  # a config snippet, absolute
    assert sorted(p.name for p in site.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
    assert (site / "key.pem").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((site / "cert.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["169.254.77.1"]
    assert names.get_values_for_type(x509.DNSName) == ["login1.example.org"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    partner = make_site(tmp_path / "ca", "partner", out=tmp_path / "sites")
    coupler_tls, partner_tls = tls_contexts(settings(site)), tls_contexts(settings(partner))
    assert handshake(coupler_tls[0], partner_tls[1]) == ""  # both signed by the one CA
    make_ca(tmp_path / "other")
    stranger = make_site(tmp_path / "other", "stranger")
    assert "unknown ca" in handshake(coupler_tls[0], tls_contexts(settings(stranger))[1])
    trusting = tls_contexts({**settings(stranger), "tls_ca_file": str(site / "ca.pem")})
    assert "certificate verify failed" in handshake(coupler_tls[0], trusting[1])


def test_certs_refuses_to_replace_files_and_bad_names(tmp_path):
    make_ca(tmp_path)
    with pytest.raises(CertificateError, match="already exist; pass --force"):
        make_ca(tmp_path)
    make_site(tmp_path, "a")
    with pytest.raises(CertificateError, match="already exist"):
        make_site(tmp_path, "a")
    for bad in ("bad host", "-x.org", "a..b"):
        with pytest.raises(CertificateError, match="neither an IP address nor a host name"):
            make_site(tmp_path, "b", hosts=[bad])
    with pytest.raises(CertificateError, match="site name"):
        make_site(tmp_path, "../escape")
    with pytest.raises(CertificateError, match="cannot read the certificate authority"):
        make_site(tmp_path / "none", "c")
    refused = gridcouple("certs", "ca", str(tmp_path), cwd=tmp_path)
    assert refused.returncode == 2 and "already exist" in refused.stderr


def test_config_check_refuses_a_host_beyond_loopback_without_tls(tmp_path):
    (tmp_path / "gridcouple.toml").write_text('[coupler]\nhost = "0.0.0.0"\n')
    check = gridcouple("config", "check", cwd=tmp_path)
    assert check.returncode == 2
    assert "gridcouple.toml:2: [coupler] host: listening on '0.0.0.0' (beyond loopback) " \
           "needs TLS; set tls_ca_file, tls_cert, tls_key in [coupler] (make them with " \
           "'gridcouple certs')" in check.stderr
    site = make_site(make_ca(tmp_path / "ca")[0].parent, "coupler")
    (tmp_path / "gridcouple.toml").write_text(
        f'[coupler]\nhost = "0.0.0.0"\ntls_ca_file = "{site / "ca.pem"}"\n'
        f'tls_cert = "{site / "cert.pem"}"\n')
    check = gridcouple("config", "check", cwd=tmp_path)
    assert "toml:3: [coupler] tls_ca_file: TLS needs all three files; set tls_key" \
        in check.stderr
    (tmp_path / "gridcouple.toml").write_text(
        (tmp_path / "gridcouple.toml").read_text() + f'tls_key = "{site / "key.pem"}"\n')
    check = gridcouple("config", "check", cwd=tmp_path)
    assert check.returncode == 0, check.stderr


def server(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gridcouple.appkit.server", "--app", "test_appkit_apps:Counter",
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, TOKEN_ENV: "secret", "PYTHONPATH": str(TESTS), **env})


def test_a_server_listens_beyond_loopback_only_with_tls(tmp_path):
    refused = server("--host", "0.0.0.0", env={})
    _, err = refused.communicate(timeout=30)
    assert refused.returncode == 2
    assert "--host 0.0.0.0: listening beyond loopback needs mutual TLS" in err


def test_a_server_whose_coupler_files_are_not_on_its_host_uses_its_own(tmp_path):
    """GRIDCOUPLE_TLS names the coupler's files; on a partner's host they are not there, and
    the server takes its site's from GRIDCOUPLE_TLS_DIR (as 'gridcouple certs site' made)."""
    ca = make_ca(tmp_path / "ca")[0].parent
    coupler, partner = make_site(ca, "coupler"), make_site(ca, "partner")
    elsewhere = {k: v.replace(str(coupler), "/nowhere") for k, v in settings(coupler).items()}
    missing = server("--host", "0.0.0.0", env={"GRIDCOUPLE_TLS": json.dumps(elsewhere)})
    _, err = missing.communicate(timeout=30)
    assert missing.returncode == 2 and "/nowhere/ca.pem is not on this host" in err
    listening = server("--host", "127.0.0.1", env={"GRIDCOUPLE_TLS": json.dumps(elsewhere),
                                                   "GRIDCOUPLE_TLS_DIR": str(partner)})
    try:
        endpoint = json.loads(listening.stdout.readline())["endpoint"]
        from gridcouple.appkit.transport import ApplicationProxy

        proxy = ApplicationProxy(endpoint, "secret", tls=tls_contexts(settings(coupler))[1])
        assert proxy.get_critical_time_step() == 0.25  # the coupler's certificate is let in
        proxy.close()
    finally:
        listening.kill()
        listening.wait()
