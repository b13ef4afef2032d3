"""Files: atomic writes, digests, free space, and how a checkpoint's fields rebuild its model.

The low-level file helpers that config, the engine's checkpoints and the ensemble directory
all use. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pat.errors import PatError
from pat.registry import Registry

if TYPE_CHECKING:
    from torch import nn

__all__ = ["atomic_write", "ensure_folder_writable", "ensure_writable", "file_digest", "free_disk", "human_bytes", "REBUILDERS"]

# (path, size, mtime_ns, inode) -> sha256: one process hashes each member file once, however
# often it loads the manifest; every rewrite (atomic_write: a new inode) misses the cache
_DIGESTS: dict[tuple[str, int, int, int], str] = {}

# torch.save reports a failed write (a full disk) as a RuntimeError from its zip writer
_TORCH_WRITE_FAILED = ("file write failed", "PytorchStreamWriter failed", "enforce fail at inline_container")


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename.

    A crash, an interrupt or a full disk leaves either the old file or the new one, never
    half of one, and no temporary file. A write the file system refuses (no space left, no
    permission) is a one-line :class:`PatError` naming the path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(path, e) from None
    # named before it exists, so that an interrupt landing right after its creation (before
    # the name could be returned, as in tempfile.mkstemp) still finds it to remove
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILED)):
            raise _write_error(path, e) from None
        raise


def _write_error(path: Path, e: BaseException) -> PatError:
    full = isinstance(e, RuntimeError) or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    if full:
        try:
            free = f", {human_bytes(free_disk(path.parent))} free"
        except OSError:
            free = ""
        return PatError(f"cannot write {str(path)!r}: no space left on the device{free}; the previous "
                        "file (if any) is unchanged. Free some space or write elsewhere.")
    reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
    return PatError(f"cannot write {str(path)!r}: {reason}.")


def ensure_writable(path: str | os.PathLike, *, force: bool, argument: str = "--out") -> Path:
    """Refuse, before any work, an output file that cannot be written or would be overwritten.

    An existing file needs ``force``. The nearest folder of ``path`` that exists must take a
    new file (probed by creating and removing one), so a read-only or misspelt location is
    named now rather than after a long training run that then cannot save.
    """
    path = Path(path)
    if path.exists() and not force:
        raise PatError(f"{argument} {str(path)!r} already exists; pass --force to overwrite it.")
    if path.is_dir():
        raise PatError(f"{argument} {str(path)!r} is a directory; give a file path.")
    ensure_folder_writable(path.absolute().parent, argument=argument, given=path)
    return path


def ensure_folder_writable(path: str | os.PathLike, *, argument: str, given: str | os.PathLike | None = None) -> Path:
    """Refuse, before any work, a folder to write into that cannot take a new file.

    The folder need not exist yet: its nearest existing ancestor must be a folder, and a file
    created there (and removed at once) must succeed, so a read-only or misspelt location is
    named now rather than after the work whose result it was to hold. ``given`` is what the
    message names (default ``path``).
    """
    path = Path(path)
    named = str(given if given is not None else path)
    folder = path.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise PatError(f"{argument} {named!r} cannot be written: {str(folder)!r} is a file, not a folder.")
    probe = folder / f".pat-probe-{secrets.token_hex(4)}"
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as e:
        raise PatError(f"{argument} {named!r} cannot be written: {str(folder)!r} takes no new file "
                       f"({e.strerror or e}).") from None
    return path


def free_disk(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def human_bytes(n: float) -> str:
    """``n`` bytes in decimal units for a person, e.g. ``"1.5 GB"``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of a file (hex), cached per process on its path, size, mtime and inode."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


# A checkpoint field -> fn(model, checkpoint) -> model: what to do to the model built from the
# checkpoint's "arch" before its weights load, when the checkpoint holds that field. The code
# that writes such a field registers it (pat.masks.physical: "kept", a physical child's channels),
# so pat.engine.checkpoint.model_from_checkpoint need not know how such a child is rebuilt.
REBUILDERS: Registry[Callable[[nn.Module, Mapping[str, Any]], nn.Module]] = Registry("checkpoint rebuilder")
