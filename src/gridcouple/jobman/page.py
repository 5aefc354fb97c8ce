"""The read-only status page: slots used of ``max_jobs``, the jobs and the clients, as one
HTML document without scripts (it reloads itself every 5 s). Every value is escaped."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #1b1b1b; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; min-width: 40em; }
th { background: #1f4e79; color: #fff; text-align: left; }
th, td { padding: 0.3em 0.8em; border: 1px solid #9aa9b8; }
tr:nth-child(even) td { background: #eef3f8; }
.slots { font-size: 1.2em; }
.active { color: #0a6b2d; font-weight: bold; } .queued, .held { color: #8a5a00; }
.failed, .timeout, .canceled { color: #a31515; }
"""


def render_page(overview: dict[str, Any], user: str) -> str:
    """The page for ``overview`` (:meth:`JobManager.overview`), as seen by ``user``."""
    now = overview["now"]
    jobs = [[str(j["id"]), j["owner"], j["name"], j["what"], j["state"], j["host"],
             _clock(j["start_time"]), _duration(j["start_time"], j["end_time"], now)]
            for j in overview["jobs"]]
    clients = [[c["user"], c["address"], f"{now - c['last_seen']:.0f} s ago", str(c["requests"]),
                str(c["live_jobs"])] for c in overview["clients"]]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="5">
<title>gridcouple job manager</title><style>{STYLE}</style></head>
<body>
<h1>gridcouple job manager</h1>
<p class="slots" id="slots">Slots used: <b>{overview['running']}</b> of
<b>{overview['max_jobs']}</b> (max_jobs); waiting: <b>{overview['waiting']}</b>;
beyond the limit jobs are {'queued' if overview['over_limit'] == 'queue' else 'refused'}.</p>
<h2>Jobs</h2>
{_table(["id", "owner", "name", "application or command", "state", "host", "started",
         "run time"], jobs, state_column=4, empty="no jobs yet")}
<h2>Clients</h2>
{_table(["user", "address", "last request", "requests", "live jobs"], clients,
        empty="no client since the server started")}
<p>Signed in as {html.escape(user)}; {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}.
Read-only; reloads every 5 s.</p>
</body></html>
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, empty: str,
           state_column: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    if not rows:
        return f'<table><tr>{head}</tr><tr><td colspan="{len(header)}">{empty}</td></tr></table>'
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            css = f' class="{html.escape(cell)}"' if index == state_column else ""
            cells.append(f"<td{css}>{html.escape(cell)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _clock(moment: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(moment)) if moment else ""


def _duration(start: float | None, end: float | None, now: float) -> str:
    if not start:
        return ""
    seconds = (end or now) - start
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
