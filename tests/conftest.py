"""Shared fixtures. Real services only: a service that is missing skips its tests with one line
saying why, except with CI=true, where it fails them."""

from __future__ import annotations

import os

import pytest


def require_service(service: str, available: bool, why: str) -> None:
    """Skip (or, with CI=true, fail) the calling test when ``service`` is not available."""
    if available:
        return
    message = f"{service} is not available: {why}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true requires {message}")
    pytest.skip(message)


@pytest.fixture
def state_dir(tmp_path):
    """A fresh gridcouple state directory (journal, job homes)."""
    path = tmp_path / "state"
    path.mkdir()
    return path
