"""``gridcouple jobman``: run a job manager for partners (``serve``, ``stop``), manage its
tokens (``token add|list|revoke``) and watch one (``status URL``). docs/jobmanager.md."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from gridcouple.cli import ConfigOption, app, new_app, open_config
from gridcouple.errors import ConfigError, GridcoupleError

TOKEN_ENV = "GRIDCOUPLE_JOBMAN_TOKEN"
console = Console()
jobman_app = new_app(help="Run a job manager for partners, manage its tokens, watch one.",
                     no_args_is_help=True)
token_app = new_app(help="Bearer tokens of the job manager's users (stored hashed).",
                    no_args_is_help=True)
jobman_app.add_typer(token_app, name="token")
app.add_typer(jobman_app, name="jobman")


@jobman_app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the job manager the config's jobmanager table describes, until SIGTERM or Ctrl-C
    (running jobs go on).
    Prints {"url", "pid", "work_root"} as one JSON line once it listens; logs go to stderr."""
    from gridcouple.jobman.server import main_announce
    from gridcouple.jobman.server import serve as run_server

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s jobman[%(process)d] %(levelname)s %(message)s")
    raise typer.Exit(run_server(open_config(config), main_announce))


@jobman_app.command()
def stop(
    config: ConfigOption = None,
    cancel_jobs: Annotated[bool, typer.Option("--cancel-jobs", help="Also cancel its jobs and stop its queue.")] = False,
) -> None:
    """Stop the job manager serving this configuration's work root."""
    from gridcouple.jobman.server import stop as stop_server

    console.print(stop_server(open_config(config), cancel_jobs=cancel_jobs), markup=False)


def _store(config: Path | None) -> Any:
    from gridcouple.jobman.server import settings_and_paths
    from gridcouple.jobman.tokens import TokenStore

    return TokenStore(settings_and_paths(open_config(config))[2])


@token_app.command("add")
def token_add(
    user: Annotated[str, typer.Argument(help="The user the token is for.", show_default=False)],
    config: ConfigOption = None,
    replace: Annotated[bool, typer.Option("--replace", help="Revoke the user's current token.")] = False,
) -> None:
    """Make a token for USER and print it (the only time it is shown; only its hash is kept)."""
    print(_store(config).add(user, replace=replace))


@token_app.command("list")
def token_list(config: ConfigOption = None) -> None:
    """The tokens made, with their users and whether they are revoked (never the tokens)."""
    table = Table("user", "fingerprint", "created", "revoked")
    for entry in _store(config).entries():
        table.add_row(entry.user, entry.fingerprint, time.ctime(entry.created),
                      time.ctime(entry.revoked) if entry.revoked else "")
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    user: Annotated[str, typer.Argument(help="Whose token to revoke.", show_default=False)],
    config: ConfigOption = None,
) -> None:
    """Revoke USER's token; a running job manager refuses it from its next request on."""
    count = _store(config).revoke(user)
    console.print(f"revoked {count} token{'s' * (count > 1)} of {user}", markup=False)


@jobman_app.command()
def status(
    url: Annotated[str, typer.Argument(help="The job manager, https://HOST:PORT.", show_default=False)],
    token_file: Annotated[Path | None, typer.Option("--token-file", help=f"An owner-only file holding the token (else ${TOKEN_ENV}).", show_default=False)] = None,
    ca_file: Annotated[Path | None, typer.Option("--ca-file", help="CA certificate(s) to trust for its TLS certificate.", show_default=False)] = None,
    once: Annotated[bool, typer.Option("--once", help="Print the table once and exit.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between refreshes.")] = 2.0,
) -> None:
    """A live table of the job manager's jobs, slots used of max_jobs, and clients."""
    from gridcouple.jobman.client import JobManagerClient, read_token

    if token_file is not None:
        token = read_token(token_file)
    elif os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV]
    else:
        raise ConfigError(f"give --token-file or set ${TOKEN_ENV}")
    try:
        client = JobManagerClient(url, token, ca_file=ca_file, timeout=10.0)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="URL") from None
    if once:
        console.print(_tables(client.call("GET", "/status"), url))
        return
    with Live(console=console, auto_refresh=False) as live:
        while True:
            try:
                view: Any = _tables(client.call("GET", "/status"), url)
            except GridcoupleError as exc:
                view = f"[red]{exc}[/red] (retrying)"
            live.update(view, refresh=True)
            time.sleep(interval)


def _tables(overview: dict[str, Any], url: str) -> Group:
    now = overview["now"]
    jobs = Table("id", "owner", "name", "application or command", "state", "host", "run time",
                 title=f"{url}: {overview['running']} of {overview['max_jobs']} slots used, "
                       f"{overview['waiting']} waiting", title_justify="left")
    for job in overview["jobs"]:
        start, end = job["start_time"], job["end_time"]
        run_time = f"{(end or now) - start:.1f} s" if start else ""
        jobs.add_row(str(job["id"]), job["owner"], job["name"], job["what"], job["state"],
                     job["host"], run_time)
    clients = Table("user", "address", "last request", "requests", "live jobs",
                    title="clients", title_justify="left")
    for client in overview["clients"]:
        clients.add_row(client["user"], client["address"],
                        f"{now - client['last_seen']:.0f} s ago", str(client["requests"]),
                        str(client["live_jobs"]))
    return Group(jobs, clients)
