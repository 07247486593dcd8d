"""Atomic file writes, the per-directory lock, and no writing through symbolic links.

Each write goes to a hidden temporary file beside the target, is fsynced, renamed over the
target, and the directory is fsynced, so a kill or a power cut leaves the old file or the
new one; a failed write removes its temporary file. `hold_lock` keeps a second command off
a directory one is writing with an flock, which the kernel drops when its holder dies, so
a lock is never stale. Every file bertforge writes is opened here with O_NOFOLLOW
(`open_new`, the lock, the temporary file of an atomic write), and a link at an output's
own name is refused (`refuse_link`). `give_usual_mode` gives the usual mode back to a file
written through a private temporary file elsewhere. The guarantees: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shlex
import shutil
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


def refuse_link(path: str | os.PathLike, what: str | None = None) -> None:
    """Refuse to write at `path` (`what`, as the message names it) when its name is a
    symbolic link: bertforge writes only through links it made (none), so a planted one
    cannot redirect a write to its target."""
    if os.path.islink(path):
        raise BertforgeError(
            f"{what or path} is a symbolic link; bertforge does not write "
            f"through a link it did not make (remove it or choose another "
            f"path)"
        )


def open_new(path: str | os.PathLike, append: bool = False, exclusive: bool = False) -> int:
    """A descriptor of `path` opened for writing (truncated, or appended to), never through
    a symbolic link; with `exclusive`, only a file this call creates."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if append else os.O_TRUNC
    if exclusive:
        flags |= os.O_EXCL
    try:
        return os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP or (
            exclusive and e.errno == errno.EEXIST and os.path.islink(path)
        ):
            refuse_link(path)
        raise


def make_dir(path: str | os.PathLike) -> Path:
    """Create directory `path` (and its parents) where missing; refuse a symbolic link at
    its name, which would send everything written inside to the link's target."""
    path = Path(path)
    refuse_link(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def temporary_path(path: Path) -> Path:
    """The hidden name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to write the file's content at a temporary path, then move it
    into place at `path` atomically and durably; returns `path`."""
    path = Path(path)
    refuse_link(path)  # os.replace would replace a link, but the caller means the target
    tmp = temporary_path(path)
    try:
        # Claimed here, without following a link: the writer then fills a file of ours.
        os.close(open_new(tmp))
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


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` (UTF-8) to `path`, never through a symbolic link."""
    fd = open_new(path, append=True)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(text)


_RENAME_EXCHANGE = 2  # linux/fs.h


def replace_dir(new: str | os.PathLike, old: str | os.PathLike) -> None:
    """Put directory `new` in place of directory `old` (or at that free name) atomically,
    and remove what was there: a kill at any point leaves at `old` the old directory
    whole or the new one whole, never a mix. Both names are on one filesystem (`new` is a
    sibling). Linux swaps them in one renameat2(RENAME_EXCHANGE); elsewhere, or on a
    filesystem without it, `old` is first moved aside, and `recover_dir` puts it back
    if a kill came between the two renames."""
    new, old = Path(new), Path(old)
    if not old.exists():
        os.replace(new, old)
        fsync(old.parent)
        return
    if not _exchange(new, old):
        aside = _aside(old)
        shutil.rmtree(aside, ignore_errors=True)  # a finished replace's, killed before removing it
        os.replace(old, aside)
        _between_renames()
        os.replace(new, old)
        new = aside
    fsync(old.parent)
    shutil.rmtree(new, ignore_errors=True)  # after the swap `new` names the old directory


def recover_dir(path: str | os.PathLike) -> None:
    """Put back the directory a `replace_dir` killed between its two renames moved aside."""
    path = Path(path)
    aside = _aside(path)
    if not path.exists() and aside.is_dir() and not aside.is_symlink():
        os.replace(aside, path)


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.replaced")


def _between_renames() -> None:
    """Nothing: the point between replace_dir's two renames, where tests inject a kill."""


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` atomically; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


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
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # a holder's release removed the directory just now
            continue
        except OSError as e:
            if e.errno == errno.ELOOP:  # a planted link: its target would be truncated
                refuse_link(path)
            raise BertforgeError(f"cannot lock {what}: {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise BertforgeError(f"{what} is in use by {holder}; wait for it to end") from None
        except OSError as e:  # a filesystem without flock (Lustre mounted without it, say)
            print(
                f"warning: cannot lock {what} ({e.strerror or e}): nothing stops a second "
                f"command on it at the same time",
                file=sys.stderr,
            )
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
        command = command[: limit - 3] + "..."
    return f"process {pid} ({command})"


def alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 only checks)."""
    if os.name != "posix":  # elsewhere os.kill(pid, 0) would terminate it
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def require_utf8(path: str | os.PathLike, what: str) -> None:
    """Refuse a path whose name is not valid UTF-8 (Python keeps the undecodable bytes as
    lone surrogates): the tokenizers library, config.yaml and the report take paths as
    text, and would fail on it only at the end of the work."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise BertforgeError(
            f"{what} {str(path)!a}: the name is not valid UTF-8; choose another"
        ) from None
