"""Writing files safely: readers never see half a file, and files get the mode the umask gives.

Every writer in prismkit goes through :func:`atomic_write`: the content goes to a temporary file
beside the target (``.<name>.<host>.<pid>.<random>.tmp``), which is given the mode a plain
``open(path, "w")`` would give (``0o666`` less the umask; ``tempfile.mkstemp`` alone gives
``0o600``, which breaks shared label stores and runs) and then renamed onto the target. A process
killed mid-write leaves the old file (or none) and a temporary file, which
:func:`remove_stale_temporaries` deletes later once its writer is known to be gone.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_UMASK_LOCK = threading.Lock()
# host names as they appear in temporary-file names (dots would make names ambiguous)
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def current_umask() -> int:
    """The process's umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file here: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see half a file.

    The file gets the mode the umask gives a new file (not ``mkstemp``'s ``0o600``); the parent
    folder is created (umask applies) when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp"
    )
    try:
        os.fchmod(fd, file_mode())
    finally:
        os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # writers that replace the file (not truncate) keep the mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a killed process nobody has reaped yet (a zombie) is gone too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def _walk_temporaries(root: Path) -> Iterator[Path]:
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.name.startswith(".") and entry.name.endswith(".tmp"):
                        yield Path(entry.path)
        except FileNotFoundError:
            continue


def remove_stale_temporaries(root: str | Path, max_age_s: float = 3600.0) -> list[Path]:
    """Delete temporary files that :func:`atomic_write` left under ``root`` when its process was
    killed: those written by a process of this host that no longer runs, and any older than
    ``max_age_s`` (a write takes milliseconds; other hosts sharing the folder may still be
    writing younger ones). Returns the files removed."""
    removed = []
    now = time.time()
    for tmp in _walk_temporaries(Path(root)):
        m = _TMP_RE.match(tmp.name)
        try:
            age = now - tmp.stat().st_mtime
        except FileNotFoundError:
            continue  # finished (renamed) meanwhile
        dead = m is not None and m["host"] == _HOST and not _pid_alive(int(m["pid"]))
        if dead or age > max_age_s:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
