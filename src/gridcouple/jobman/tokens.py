"""Bearer tokens per user, stored hashed in an owner-only JSON file.

A token is ``gcjm_`` and 43 random URL-safe characters (256 bits), shown once when made. The
file keeps its SHA-256 only: with 256 random bits a fast hash is enough (nothing to guess), and
a stolen file lets nobody in. ``gridcouple jobman token add|list|revoke`` edits the file; a
running server notices the change on the next request, so a revoked token stops working at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridcouple.errors import ConfigError, GridcoupleError

PREFIX = "gcjm_"
MAX_TOKEN_LENGTH = 128
USER = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")


class TokenError(GridcoupleError):
    """A token command could not be carried out (unknown user, bad name ...)."""


@dataclass(frozen=True)
class TokenInfo:
    """What ``token list`` shows: never the token, only the start of its hash."""

    user: str
    created: float
    revoked: float | None
    fingerprint: str


def digest(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def read_owner_only(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a token file, which must be owner-only and not a symlink; ConfigError
    otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"token file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if mode & 0o077:
            raise ConfigError(f"token file {path} is open to others (mode "
                              f"{stat.S_IMODE(mode):04o}); make it owner-only: chmod 600")
        return file.read()


class TokenStore:
    """The token file of one job manager (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) last loaded
        self._users: dict[str, str] = {}  # sha256 -> user, active tokens only

    # --- the server's side ---------------------------------------------------------------

    def verify(self, token: str) -> str | None:
        """The user a token belongs to, or None (unknown, revoked, malformed)."""
        if not token.startswith(PREFIX) or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            return None
        self._reload()
        return self._users.get(digest(token))

    def _reload(self) -> None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            self._seen, self._users = None, {}
            return
        seen = (info.st_ino, info.st_size, info.st_mtime_ns)
        if seen != self._seen:
            self._users = {t["sha256"]: t["user"] for t in self._read()["tokens"]
                           if t.get("revoked") is None}
            self._seen = seen

    # --- the administrator's side ----------------------------------------------------------

    def add(self, user: str, *, replace: bool = False) -> str:
        """Make a token for ``user`` and return it (the only time it is seen). With
        ``replace``, the user's current token is revoked; without, a user with a token is
        refused."""
        if not USER.fullmatch(user):
            raise TokenError(f"user name {user!r}: use 1-64 letters, digits, '_', '.', '@', "
                             "'+' or '-'")
        token = PREFIX + secrets.token_urlsafe(32)
        with self._editing() as data:
            active = [t for t in data["tokens"] if t["user"] == user and t["revoked"] is None]
            if active and not replace:
                raise TokenError(f"{user} already has a token (made "
                                 f"{time.ctime(active[0]['created'])}); revoke it first or "
                                 "use --replace")
            for entry in active:
                entry["revoked"] = time.time()
            data["tokens"].append({"user": user, "sha256": digest(token),
                                   "created": time.time(), "revoked": None})
        return token

    def revoke(self, user: str) -> int:
        """Revoke every active token of ``user``; returns how many."""
        with self._editing() as data:
            active = [t for t in data["tokens"] if t["user"] == user and t["revoked"] is None]
            if not active:
                known = sorted({t["user"] for t in data["tokens"] if t["revoked"] is None})
                raise TokenError(f"{user!r} has no active token in {self.path}; users with "
                                 f"one: {', '.join(known) or 'none'}")
            for entry in active:
                entry["revoked"] = time.time()
        return len(active)

    def entries(self) -> list[TokenInfo]:
        """Every token made, revoked ones too, oldest first."""
        if not self.path.exists():
            return []
        return [TokenInfo(t["user"], t["created"], t["revoked"], t["sha256"][:12])
                for t in self._read()["tokens"]]

    # --- the file ----------------------------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        text = read_owner_only(self.path)
        try:
            data = json.loads(text)
            for entry in data["tokens"]:
                if not (isinstance(entry["user"], str) and isinstance(entry["sha256"], str)):
                    raise TypeError("user and sha256 must be strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"token file {self.path} is damaged: {exc}") from None
        return data

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, Any]]:
        """The file's data to change, written back atomically (owner-only) under a lock."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            data = self._read() if self.path.exists() else {"version": 1, "tokens": []}
            yield data
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as file:
                json.dump(data, file, indent=1)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, self.path)
        finally:
            os.close(lock_fd)
