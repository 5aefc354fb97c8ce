"""File operations confined to one directory (a job's working directory, an upload).

A path is relative, with no ``..``, ``.`` or empty part; every part is opened below the root
with ``O_NOFOLLOW`` through directory descriptors, so no symlink is ever followed, whoever made
it (the job itself may), and no check can be raced by renaming a directory meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAX_PATH = 1024
MAX_LISTING = 10_000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathRefused(ValueError):
    """A path that leaves the directory, or names what it may not (the message says which)."""


class FileMissing(LookupError):
    """Nothing of that name (or not the kind asked for: a directory for a file ...)."""


def clean_parts(path: str) -> tuple[str, ...]:
    """The parts of a relative path; PathRefused for anything that could leave the root."""
    if not path:
        raise PathRefused("the path is empty")
    if len(path) > MAX_PATH:
        raise PathRefused(f"the path is longer than {MAX_PATH} characters")
    if "\0" in path or "\\" in path:
        raise PathRefused(f"{path!r}: NUL bytes and backslashes are not allowed in a path")
    try:
        path.encode()
    except UnicodeEncodeError:
        raise PathRefused(f"{path!r}: not UTF-8 (a lone surrogate)") from None
    if path.startswith("/"):
        raise PathRefused(f"{path!r}: absolute paths are not allowed; give a path relative to "
                          "the job's working directory")
    parts = tuple(path.split("/"))
    if any(part in ("", ".", "..") for part in parts):
        raise PathRefused(f"{path!r}: '..', '.' and empty parts are not allowed")
    if any(len(part.encode()) > 255 for part in parts):
        raise PathRefused(f"{path!r}: a part is longer than 255 bytes")
    return parts


@contextlib.contextmanager
def _directory(root: Path, parts: tuple[str, ...], *, create: bool = False) -> Iterator[int]:
    """A descriptor of the directory ``root/parts...``, walked without following symlinks;
    with ``create``, missing directories are made (0700)."""
    fd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise FileMissing(f"no directory {'/'.join(parts)}") from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _refusal(exc, parts) from None
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _refusal(exc: OSError, parts: tuple[str, ...]) -> Exception:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return PathRefused(f"{'/'.join(parts)!r}: a symlink or a file is in the way "
                           "(symlinks are never followed)")
    return exc


def open_for_reading(root: Path, path: str) -> tuple[int, int]:
    """An open descriptor of a regular file below ``root``, and its size."""
    parts = clean_parts(path)
    with _directory(root, parts[:-1]) as dir_fd:
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                         dir_fd=dir_fd)
        except FileNotFoundError:
            raise FileMissing(f"no file {path}") from None
        except OSError as exc:
            raise _refusal(exc, parts) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise FileMissing(f"{path} is not a regular file")
    return fd, info.st_size


class Writer:
    """A file being written below a root: a hidden temporary file, renamed over ``path`` when
    complete (:meth:`commit`), removed otherwise (:meth:`discard`)."""

    def __init__(self, root: Path, path: str) -> None:
        self.parts = clean_parts(path)
        self.size = 0
        self._temp = f".gcjm-partial-{secrets.token_hex(8)}"
        with _directory(root, self.parts[:-1], create=True) as dir_fd:
            self._dir_fd = os.dup(dir_fd)
        try:
            self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o600, dir_fd=self._dir_fd)
        except OSError:
            os.close(self._dir_fd)
            raise

    def write(self, data: bytes) -> None:
        """Append bytes."""
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.size += len(data)

    def commit(self) -> None:
        """Put the file in place (replacing a file of that name; never a directory)."""
        try:
            os.close(self._fd)
            target = self.parts[-1]
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(os.stat(target, dir_fd=self._dir_fd,
                                        follow_symlinks=False).st_mode):
                    raise PathRefused(f"{'/'.join(self.parts)} is a directory")
            os.rename(self._temp, target, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except BaseException:
            self._unlink()
            raise
        finally:
            os.close(self._dir_fd)

    def discard(self) -> None:
        """Drop what was written."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._unlink()
        with contextlib.suppress(OSError):
            os.close(self._dir_fd)

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._temp, dir_fd=self._dir_fd)


def remove(root: Path, path: str) -> None:
    """Remove a file, a symlink (not what it points to) or a whole directory below ``root``."""
    parts = clean_parts(path)
    with _directory(root, parts[:-1]) as dir_fd:
        try:
            info = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise FileMissing(f"no file or directory {path}") from None
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(parts[-1], dir_fd=dir_fd)  # fd-based: safe against symlink races
        else:
            os.unlink(parts[-1], dir_fd=dir_fd)


def listing(root: Path, path: str = "") -> list[dict[str, Any]]:
    """Entries below ``root/path`` (recursively, at most MAX_LISTING): ``path`` (relative to
    ``root``), ``type`` (file, dir, symlink, other), ``size``, ``mtime``. ``path`` names a
    directory or one file."""
    parts = clean_parts(path) if path else ()
    entries: list[dict[str, Any]] = []
    if parts:
        with _directory(root, parts[:-1]) as dir_fd:
            try:
                info = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise FileMissing(f"no file or directory {path}") from None
        if not stat.S_ISDIR(info.st_mode):
            return [_entry(path, info)]
    with _directory(root, parts) as fd:
        _walk(fd, path, entries)
    return entries


def _walk(dir_fd: int, prefix: str, entries: list[dict[str, Any]]) -> None:
    for name in sorted(os.listdir(dir_fd)):
        if len(entries) >= MAX_LISTING:
            return
        if name.startswith(".gcjm-partial-"):
            continue
        relative = f"{prefix}/{name}" if prefix else name
        try:  # the job may change its directory meanwhile: what went is skipped
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            entries.append(_entry(relative, info))
            if not stat.S_ISDIR(info.st_mode):
                continue
            child = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            continue
        try:
            _walk(child, relative, entries)
        finally:
            os.close(child)


def _entry(path: str, info: os.stat_result) -> dict[str, Any]:
    kind = ("dir" if stat.S_ISDIR(info.st_mode) else "file" if stat.S_ISREG(info.st_mode)
            else "symlink" if stat.S_ISLNK(info.st_mode) else "other")
    return {"path": path, "type": kind, "size": info.st_size if kind == "file" else 0,
            "mtime": info.st_mtime}
