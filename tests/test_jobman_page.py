"""The job manager's status page in a real headless browser (Debian's chromium): signed in
with the token (HTTP Basic), it shows the slots and a table of the jobs and one of the clients;
without the token it shows none of it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import require_service
from test_jobman_helpers import running_jobman, wait_for

HEADER = (0x1F, 0x4E, 0x79)  # the table headers' background (page.STYLE)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium")
    require_service("chromium", browser is not None, "apt-get install -y chromium")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([str(browser), *FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=90)


def header_rows(png: Path) -> list[int]:
    """The rows of the screenshot where a table header's colour runs wider than 300 px."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    width, height = image.size
    pixels = image.load()
    return [y for y in range(height)
            if sum(1 for x in range(0, width, 2) if pixels[x, y] == HEADER) > 150]


def test_the_status_page_shows_the_tables_behind_the_same_authentication(tmp_path):
    with running_jobman(tmp_path / "jm", max_jobs=2) as jm:
        client = jm.client()
        ids = [j["id"] for j in client.call("POST", "/jobs", {"jobs": [
            {"argv": ["sleep", "60"], "name": "long-one"},
            {"argv": ["true"], "name": "short-one"}]})["jobs"]]
        wait_for(lambda: [s["state"] for s in client.call("POST", "/jobs/status",
                                                          {"ids": ids})["jobs"]]
                 == ["active", "completed"])
        signed_in = jm.url.replace("http://", f"http://alice:{jm.token}@") + "/status"
        png = tmp_path / "status.png"
        shot = chromium(tmp_path, signed_in, "--window-size=1100,700", f"--screenshot={png}")
        assert png.exists(), shot.stderr[-2000:]
        rows = header_rows(png)
        bands = [y for y in rows if y - 1 not in rows]
        assert len(bands) == 2, rows  # the jobs table and the clients table
        assert len(rows) > 30  # each header is a row of text high
        dom = chromium(tmp_path, signed_in, "--dump-dom").stdout
        assert "Slots used: <b>1</b> of\n<b>2</b>" in dom
        for text in ("long-one", "short-one", '<td class="active">active</td>',
                     '<td class="completed">completed</td>', "<td>127.0.0.1</td>",
                     "Signed in as alice"):
            assert text in dom, text
        stranger = chromium(tmp_path, jm.url + "/status", "--dump-dom").stdout
        assert "long-one" not in stranger and "<table" not in stranger  # a sign-in prompt
        wrong = jm.url.replace("http://", "http://alice:gcjm_wrong@") + "/status"
        assert "<table" not in chromium(tmp_path, wrong, "--dump-dom").stdout
        assert "refused 127.0.0.1: 401 GET /status" in jm.log_text()


@pytest.fixture(autouse=True)
def _pillow():
    pytest.importorskip("PIL", reason="Pillow reads the screenshot (matplotlib's dependency)")
