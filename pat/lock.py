"""One writer per ensemble directory: ``<dir>/ensemble.lock``, held with ``fcntl.flock``.

Commands that write a directory (split, tune, the producers, select, calibrate) hold the
lock while they run; readers (eval) do not need it, since every write is atomic. A second
writer is refused with one line naming the holder (pid, host, command, since when), or
waits for it (``wait=True``, ``--wait`` on the command line).

``flock`` is released by the kernel when its holder dies, so a killed run leaves no stale
lock. The holder removes the file when it is done; a waiter that gets the lock on a file
that has since been removed (or replaced) opens the new one and tries again, so two
processes never both hold "the" lock. The lock is re-entrant within one process (the CLI
takes it, then the library function it calls takes it again).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pat.errors import PatError
from pat.store import MANIFEST

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: no locking
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "directory_lock", "acquire", "release", "lock_scope", "holder", "writes_directory"]

LOCK_FILE = "ensemble.lock"
F = TypeVar("F", bound=Callable[..., Any])
_wait: contextvars.ContextVar[bool] = contextvars.ContextVar("pat_lock_wait", default=False)
_scope: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("pat_lock_scope", default=None)


@dataclass
class _Held:
    fd: int
    count: int


_HELD: dict[Path, _Held] = {}  # resolved directory -> this process's lock on it


def holder(path: str | os.PathLike) -> dict | None:
    """Who holds (or last held) the lock of directory ``path``: pid, host, command, since."""
    try:
        return json.loads((Path(path) / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return None


def _describe(info: dict | None) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('command')!r}, since {since})"


def acquire(path: str | os.PathLike, *, wait: bool | None = None, command: str | None = None,
            argument: str = "ENSEMBLE_DIR", create: bool = False) -> None:
    """Take the lock of directory ``path``; pair with :func:`release`.

    Args:
        path: the directory to lock; its lock file lives inside it.
        create: make the directory if it is missing; otherwise a missing directory, or one
            that holds no ensemble, is not locked (the caller's own check then names it).
        wait: block until the holder finishes; None: the enclosing :func:`lock_scope`'s choice
            (default False: refuse at once).
        command: recorded for the refusal message of a second writer; default ``sys.argv``.
        argument: how the refusal message names ``path``, e.g. the CLI argument it came from.

    Raises:
        PatError: another process holds the lock and ``wait`` is off.
    """
    if fcntl is None:
        return
    key = Path(path).resolve()
    if key in _HELD:
        _HELD[key].count += 1
        return
    wait = _wait.get() if wait is None else wait
    try:
        if create:
            key.mkdir(parents=True, exist_ok=True)
        elif not (key / MANIFEST).is_file():
            return
    except OSError as e:
        raise _unwritable(path, argument, e) from None
    file = key / LOCK_FILE
    while True:
        try:
            fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _unwritable(path, argument, e) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise PatError(f"{argument} {str(path)!r} is being written by {_describe(holder(key))}; "
                               "wait for it to finish, or pass --wait to queue behind it.") from None
            try:  # the holder before us may have removed the file we locked: lock the new one
                same = os.stat(file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "command": command or " ".join(["pat", *sys.argv[1:]]), "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[key] = _Held(fd, 1)
    scope = _scope.get()
    if scope is not None:
        scope.append(key)


def _unwritable(path: str | os.PathLike, argument: str, error: OSError) -> PatError:
    """A directory on a read-only or pseudo file system: one line, not a traceback."""
    return PatError(f"{argument} {str(path)!r} cannot be written ({error.strerror or error}); "
                    "pat keeps its lock file and its members there.")


def release(path: str | os.PathLike) -> None:
    """Give back one :func:`acquire` of ``path``; the last one removes the file and unlocks it."""
    key = Path(path).resolve()
    held = _HELD.get(key)
    if held is None:
        return
    held.count -= 1
    if held.count > 0:
        return
    del _HELD[key]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(key / LOCK_FILE)  # before unlocking: a waiter then sees the file is gone
    os.close(held.fd)


@contextlib.contextmanager
def directory_lock(path: str | os.PathLike, *, wait: bool | None = None, command: str | None = None,
                   argument: str = "ENSEMBLE_DIR", create: bool = False) -> Iterator[None]:
    """Hold the lock of directory ``path`` for the ``with`` block (see :func:`acquire`)."""
    acquire(path, wait=wait, command=command, argument=argument, create=create)
    try:
        yield
    finally:
        release(path)


@contextlib.contextmanager
def lock_scope(*, wait: bool = False) -> Iterator[None]:
    """Scope one command's run: the locks it takes and whether they wait.

    Locks taken inside wait or not as ``wait`` says, and are all given back when the block
    ends, however it ends (a producer that failed half-way included).
    """
    token_wait, token_scope = _wait.set(wait), _scope.set([])
    try:
        yield
    finally:
        taken = _scope.get() or []
        _wait.reset(token_wait)
        _scope.reset(token_scope)
        for key in taken:
            while key in _HELD:
                release(key)


def writes_directory(func: F) -> F:
    """Run ``func`` holding the lock of the ensemble directory it rewrites.

    ``func``'s first argument is the directory, which it loads, changes and saves; holding
    the lock throughout means no concurrent update is lost.
    """

    @functools.wraps(func)
    def wrapper(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        with directory_lock(path):
            return func(path, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
