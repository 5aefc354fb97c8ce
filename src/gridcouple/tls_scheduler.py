"""A dask scheduler that speaks mutual TLS only, also on loopback.

distributed's protocol carries pickles: whoever connects to a scheduler can run code in its
process. So every scheduler gridcouple starts (the coupler's, a :class:`gridcouple.dask.
BatchCluster`'s) accepts only peers holding its certificate: the configured one (``[coupler]
tls_ca_file``, ``tls_cert``, ``tls_key``), else one made for the session
(``Security.temporary()``), handed to its own jobs in their environment. A peer without it is
refused at the TLS handshake, before a byte of dask protocol is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distributed import Scheduler
    from distributed.security import Security

    from gridcouple.config import CouplerSection


def configured_tls(settings: CouplerSection) -> dict[str, Any]:
    """distributed ``Security`` keyword arguments from ``[coupler]``'s TLS files (the config
    checked them when loaded: all three or none); {} when none are set."""
    if settings.tls_ca_file is None or settings.tls_cert is None or settings.tls_key is None:
        return {}
    ca, cert, key = str(settings.tls_ca_file), str(settings.tls_cert), str(settings.tls_key)
    return {"require_encryption": True, "tls_ca_file": ca, "tls_client_cert": cert,
            "tls_client_key": key, "tls_scheduler_cert": cert, "tls_scheduler_key": key,
            "tls_worker_cert": cert, "tls_worker_key": key}


def session_security(configured: Mapping[str, Any]) -> Security:
    """The configured certificates, else a certificate made for this session (10-40 ms)."""
    from distributed.security import Security

    if configured:
        return Security(**configured)
    return Security.temporary()


def client_kwargs(security: Any) -> dict[str, Any]:
    """What a peer needs to connect as a client to a scheduler of ``security`` (a distributed
    ``Security``); JSON-ready: a session's certificate travels as PEM text."""
    return {"require_encryption": True, "tls_ca_file": security.tls_ca_file,
            "tls_client_cert": security.tls_client_cert,
            "tls_client_key": security.tls_client_key}


def worker_kwargs(security: Any) -> dict[str, Any]:
    """What a dask worker needs: the client role to reach the scheduler, and the same
    certificate to listen with (the scheduler and other workers connect to it)."""
    kwargs = client_kwargs(security)
    kwargs.update(tls_worker_cert=security.tls_worker_cert or security.tls_client_cert,
                  tls_worker_key=security.tls_worker_key or security.tls_client_key)
    return kwargs


async def start_tls_scheduler(host: str, port: int, security: Security, *,
                              dashboard_address: str | None = None,
                              handlers: Mapping[str, Callable[..., Any]] | None = None,
                              ) -> Scheduler:
    """Start a scheduler listening on ``tls://host:port`` (port 0: any free one) in the running
    event loop, with extra comm ``handlers`` installed before it listens.
    ``dashboard_address`` None: no HTTP routes (its HTTP server still listens on ``host``, any
    free port, and answers 404); else the dashboard's routes there."""
    import dask
    from distributed import Scheduler

    if dashboard_address is None:
        http = f"[{host}]:0" if ":" in host else f"{host}:0"
        with dask.config.set({"distributed.scheduler.http.routes": []}):
            scheduler = Scheduler(host=host, port=port, dashboard=False,
                                  dashboard_address=http, security=security, protocol="tls")
    else:
        scheduler = Scheduler(host=host, port=port, dashboard=True,
                              dashboard_address=dashboard_address, security=security,
                              protocol="tls")
    scheduler.handlers.update(handlers or {})
    return await scheduler
