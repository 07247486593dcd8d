"""Atomic file writes: a kill or a crash at any moment leaves the old file or the new one.

Each write goes to a hidden temporary file beside the target (the same filesystem, so the
rename is atomic), is fsynced, renamed over the target, and the directory is fsynced so
the rename itself survives a power cut. A failed write removes its temporary file.
Files written through a private temporary file elsewhere get the usual mode back with
`give_usual_mode`.

`hold_lock` keeps a second command off a directory that one is writing (a run, a data
directory being prepared): an flock, which the kernel drops when its holder dies, even by
kill -9, so a lock is never stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from bertforge.errors import BertforgeError


def fsync(path: Path) -> None:
    """Flush a file's or a directory's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """The hidden name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` to write the file's content at a temporary path, then move it
    into place at `path` atomically and durably; returns `path`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically and durably."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can
    only read it by setting it, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_usual_mode(path: str | os.PathLike) -> None:
    """Give a file the mode a plain open() would have: 0666 less the umask. Writers that go
    through a private temporary file (safetensors' save_file) leave 0600 behind."""
    os.chmod(path, 0o666 & ~umask())


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on lock file `path` for the block, or refuse at once with
    BertforgeError naming the holder's pid and command; `what` names the locked thing
    ("run directory runs/a").

    The file holds the holder's pid and command. It is removed on release, and so are the
    directories made for it when nothing else went into them: a command that fails before
    writing anything leaves nothing behind. On a filesystem without flock it warns and goes
    on unlocked.
    """
    path = Path(path)
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # deepest first
    fd = _acquire(path, what)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": _command()}).encode())
        yield
    finally:
        # Removed while still locked: whoever opens the name from now on gets a new file.
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        for d in made:
            try:
                d.rmdir()
            except OSError:  # not empty: the command wrote something there
                break


def _acquire(path: Path, what: str) -> int:
    """An open descriptor of lock file `path`, exclusively flocked."""
    for _ in range(100):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a holder's release removed the directory just now
            continue
        except OSError as e:
            raise BertforgeError(f"cannot lock {what}: {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise BertforgeError(f"{what} is in use by {holder}; wait for it to end") from None
        except OSError as e:  # a filesystem without flock (Lustre mounted without it, say)
            print(f"warning: cannot lock {what} ({e.strerror or e}): nothing stops a second "
                  f"command on it at the same time", file=sys.stderr)
            return fd
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the file a holder removed as it released it: lock the new one
    raise BertforgeError(f"cannot lock {what}: {path} keeps being replaced")


def _command() -> str:
    """This process's command line, as a holder of a lock is named to others."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"


def _holder(fd: int, limit: int = 100) -> str:
    """'process PID (COMMAND)' from a lock file; its command cut to one short line."""
    try:
        record = json.loads(os.pread(fd, 65536, 0))
        pid, command = int(record["pid"]), " ".join(str(record["command"]).split())
    except (OSError, ValueError, TypeError, KeyError):  # being written, or not ours
        return "another process"
    if len(command) > limit:
        command = command[:limit - 3] + "..."
    return f"process {pid} ({command})"


def require_utf8(path: str | os.PathLike, what: str) -> None:
    """Refuse a path whose name is not valid UTF-8 (Python keeps the undecodable bytes as
    lone surrogates): the tokenizers library, config.yaml and the report take paths as
    text, and would fail on it only at the end of the work."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise BertforgeError(f"{what} {str(path)!a}: the name is not valid UTF-8; "
                             f"choose another") from None
