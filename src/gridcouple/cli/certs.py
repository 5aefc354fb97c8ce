"""``gridcouple certs``: a small certificate authority and a certificate per site, for the mutual
TLS every connection beyond loopback uses (the coupler's registry and dask scheduler, the
application servers, their field reads). No openssl recipes.

::

    gridcouple certs ca ~/gc-ca                                  # once: ca.pem, ca-key.pem
    gridcouple certs site coupler --ca ~/gc-ca --host login1.hpc.example.org
    gridcouple certs site partner --ca ~/gc-ca                   # a workstation: no host needed

Each site gets a directory ``NAME/`` with ``ca.pem`` (the authority's certificate), ``cert.pem``
and ``key.pem`` (owner-only). The coupler's site goes into ``[coupler] tls_ca_file``,
``tls_cert`` and ``tls_key``; a partner's host keeps its site's directory as
``~/.config/gridcouple/tls`` (or names it in ``$GRIDCOUPLE_TLS_DIR``), where its application
servers look when the coupler's files are not on that host. Peers check that a certificate was
signed by the authority, not its host name: jobs land on nodes no certificate can list.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gridcouple.cli import app, new_app
from gridcouple.errors import GridcoupleError

CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
SITE_FILES = ("ca.pem", "cert.pem", "key.pem")
DEFAULT_DAYS = 365

certs_app = new_app(help="Make a certificate authority and a certificate per site for mutual "
                    "TLS beyond loopback.", no_args_is_help=True)
app.add_typer(certs_app, name="certs")


class CertificateError(GridcoupleError):
    """A certificate could not be made (files present, a bad host, an unreadable CA)."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data`` to a new file (owner-only when ``private``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _refuse_existing(paths: list[Path], force: bool) -> None:
    present = [str(p) for p in paths if p.exists()]
    if present and not force:
        raise CertificateError(f"{', '.join(present)} already exist; pass --force to replace "
                               "them (certificates made with the old ones stop working)")


def _check_days(days: int) -> None:
    if days < 1 or days > 3650:
        raise CertificateError(f"--days must be 1 to 3650, got {days}")


def make_ca(directory: Path, *, name: str = "gridcouple CA", days: int = DEFAULT_DAYS,
            force: bool = False) -> tuple[Path, Path]:
    """A new certificate authority in ``directory``: (ca.pem, ca-key.pem)."""
    _check_days(days)
    directory = Path(directory).expanduser().absolute()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    _refuse_existing([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_pair(key_path, key, cert_path, cert)
    return cert_path, key_path


def _write_pair(key_path: Path, key: ec.EllipticCurvePrivateKey, cert_path: Path,
                cert: x509.Certificate) -> None:
    """A private key (owner-only) and its certificate, as PEM."""
    _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    directory = Path(directory).expanduser()
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot read the certificate authority in {directory} "
                               f"({CA_CERT}, {CA_KEY}; make one with 'gridcouple certs ca'): "
                               f"{exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{directory / CA_KEY} is not a key 'gridcouple certs ca' made")
    return cert, key


def _alternative_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(
            label and len(label) <= 63 and label.replace("-", "").isalnum()
            and label.isascii() and not label.startswith("-") for label in labels):
        raise CertificateError(f"--host {host!r} is neither an IP address nor a host name")
    return x509.DNSName(host)


def make_site(ca_directory: Path, name: str, *, hosts: list[str] | None = None,
              out: Path | None = None, days: int = DEFAULT_DAYS,
              force: bool = False) -> Path:
    """A certificate for the site ``name``, signed by the authority in ``ca_directory``, in
    ``out/NAME`` (default: beside the authority): ca.pem, cert.pem, key.pem. ``hosts`` (names
    or addresses) go into its subject alternative names."""
    _check_days(days)
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise CertificateError(f"site name {name!r}: use letters, digits, '-', '_' and '.'")
    ca_cert, ca_key = _load_ca(ca_directory)
    names = [_alternative_name(h) for h in dict.fromkeys(hosts or [])]
    directory = Path(out or ca_directory).expanduser().absolute() / name
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = [directory / f for f in SITE_FILES]
    _refuse_existing(paths[1:], force)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(min(now + datetime.timedelta(days=days),
                                    ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_pair(paths[2], key, paths[1], cert)
    _write(paths[0], ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return directory


DaysOption = Annotated[int, typer.Option("--days", metavar="N",
                                         help="How long the certificate is valid.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace files that exist.")]


@certs_app.command("ca")
def ca_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write ca.pem and "
                                              "ca-key.pem (made if missing).")],
    name: Annotated[str, typer.Option("--name", help="The authority's common name.")] =
    "gridcouple CA",
    days: DaysOption = DEFAULT_DAYS,
    force: ForceOption = False,
) -> None:
    """Make a certificate authority: sign each site's certificate with it, and keep its key
    (ca-key.pem, owner-only) off the sites."""
    cert, key = make_ca(directory, name=name, days=days, force=force)
    typer.echo(f"certificate authority: {cert}\nits key (keep it private): {key}\n"
               f"next: gridcouple certs site NAME --ca {directory}")


@certs_app.command("site")
def site_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The site: 'coupler', a "
                                        "partner's or a cluster's name.")],
    ca: Annotated[Path, typer.Option("--ca", metavar="DIR", help="The authority's directory "
                                     "(from 'gridcouple certs ca').")],
    host: Annotated[list[str] | None, typer.Option(
        "--host", metavar="HOST", help="A name or address of the site (repeatable); "
        "recorded in the certificate.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="DIR", help="Where to make NAME/ (default: the authority's "
        "directory).")] = None,
    days: DaysOption = DEFAULT_DAYS,
    force: ForceOption = False,
) -> None:
    """Make a site's certificate and key, signed by the authority, in NAME/ with the
    authority's certificate: what the coupler names in [coupler], or what a partner's host
    keeps in ~/.config/gridcouple/tls."""
    directory = make_site(ca, name, hosts=host, out=out, days=days, force=force)
    typer.echo(f"site {name}: {directory}/cert.pem, key.pem (owner-only), ca.pem")
    typer.echo("for the coupler's host, in gridcouple.toml:\n  [coupler]\n"
               f'  tls_ca_file = "{directory}/ca.pem"\n  tls_cert = "{directory}/cert.pem"\n'
               f'  tls_key = "{directory}/key.pem"')
    typer.echo(f"for a partner's host: copy {directory} to ~/.config/gridcouple/tls there (or "
               "name it in $GRIDCOUPLE_TLS_DIR)")
