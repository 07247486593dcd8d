"""Where a command may write: its outputs against its inputs, before any work.

One rule for every command (`check_paths`): each input and output path is resolved,
symbolic links too, and an output that is, contains or lies inside an input, or lies
inside (or would replace) an artefact of another kind, or is `/` or the home directory
itself, is refused in one line. An artefact is a directory bertforge writes: a
tokenizer, data, a run, an export, a fine-tuning run, a GLUE run or a report.

Every such directory carries a MARKER naming its kind. bertforge deletes or replaces a
directory only when it can show it wrote it (`owned`: the marker), and replaces it
atomically (`replace_owned`: built in a sibling, then swapped in by rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from bertforge.errors import BertforgeError
from bertforge.fileio import (
    alive,
    make_dir,
    recover_dir,
    refuse_link,
    replace_dir,
    write_text_atomic,
)

MARKER = ".bertforge"
KINDS = ("tokenizer", "data", "run", "export", "finetune", "glue", "report")
# What bertforge writes besides its outputs' content: not the user's files.
_OURS = {MARKER, ".lock"}


@dataclasses.dataclass(frozen=True)
class Output:
    """An output flag: the path given, the kind written there (a KINDS directory, or
    "file"), and the kinds of artefact it belongs inside (a report inside its run)."""

    flag: str
    path: str | os.PathLike
    kind: str
    home: tuple[str, ...] = ()


def mark(directory: Path, kind: str) -> None:
    """Record that bertforge made `directory` as a `kind` directory."""
    write_text_atomic(directory / MARKER, json.dumps({"kind": kind}) + "\n")


def make_marked(directory: Path, kind: str) -> Path:
    """Create `directory` (never through a planted link) and mark it, when it is new or
    holds nothing but bertforge's own files (the lock made it)."""
    make_dir(directory)
    if all(p.name in _OURS for p in directory.iterdir()) and not (directory / MARKER).exists():
        mark(directory, kind)
    return directory


def _marker_kind(directory: Path) -> str | None:
    marker = directory / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        kind = json.loads(marker.read_text())["kind"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return kind if kind in KINDS else None


def _layout_kind(d: Path) -> str | None:
    """The kind an unmarked directory's files show (a model or tokenizer directory from
    elsewhere, say); None when they show none."""

    def has(name: str) -> bool:
        return (d / name).exists()

    if has("manifest.json"):
        return "data"
    if has("finetune.json"):
        return "finetune"
    if has("config.yaml") and (has("checkpoints") or has("metrics.jsonl") or has("tokenizer")):
        return "run"
    if has("glue.json"):
        return "glue"
    if has("config.json") and (
        has("model.safetensors") or has("pytorch_model.bin") or has("model.safetensors.index.json")
    ):
        return "export"
    if has("tokenizer.json") or (has("vocab.txt") and has("tokenizer_config.json")):
        return "tokenizer"
    if has("report.md") and any(p.suffix == ".png" for p in d.iterdir()):
        return "report"
    return None


def kind_of(path: str | os.PathLike) -> str | None:
    """The kind of artefact directory at `path` (its marker's, else its layout's)."""
    path = Path(path)
    if not path.is_dir():
        return None
    try:
        return _marker_kind(path) or _layout_kind(path)
    except OSError:  # unreadable: not something bertforge can show it made
        return None


def owned(path: Path, kind: str) -> bool:
    """Whether `path` is a `kind` directory bertforge can show it wrote."""
    if path.is_symlink() or not path.is_dir():
        return False
    if all(p.name in _OURS for p in path.iterdir()):
        return True  # empty: nothing of anyone's to lose
    try:
        return _marker_kind(path) == kind  # a layout alone is not proof: only the marker
    except OSError:
        return False


def require_owned(path: Path, kind: str) -> None:
    """Refuse to delete or replace `path` unless bertforge wrote it as a `kind` directory."""
    refuse_link(path)
    if os.path.lexists(path) and not owned(path, kind):
        raise BertforgeError(
            f"{path} exists and is not {_a(kind)} directory bertforge wrote; "
            f"it is left alone (move it away or choose another output)"
        )


def remove_owned(path: Path, kind: str) -> None:
    """Delete directory `path`, only when bertforge wrote it as a `kind` directory."""
    require_owned(path, kind)
    shutil.rmtree(path, ignore_errors=True)


def sibling(path: Path) -> Path:
    """A hidden name beside `path` (on its filesystem, so a rename into place is atomic)
    to build its new content under; those of killed commands are removed here."""
    name = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.new")
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            found = name.fullmatch(entry.name)
            if found and entry.is_dir() and not entry.is_symlink() and not alive(int(found[1])):
                shutil.rmtree(entry, ignore_errors=True)
    return path.with_name(f".{path.name}.{os.getpid()}.new")


def replace_owned(new: Path, path: Path, kind: str) -> None:
    """Put directory `new` at `path` atomically, marked as `kind`, replacing only a
    directory bertforge wrote there as `kind`."""
    recover_dir(path)  # a replace killed between its renames
    require_owned(path, kind)
    mark(new, kind)
    replace_dir(new, path)


class Undo:
    """Within the block, the entries `names` of `directory` that are absent at its start
    are removed if the block fails, unless `done()` was called first: a command that fails
    before its real work leaves nothing it made, and removes nothing it did not make."""

    def __init__(self, directory: Path, names: Iterable[str]) -> None:
        self.made = [directory / n for n in names if not os.path.lexists(directory / n)]

    def done(self) -> None:
        self.made = []

    def __enter__(self) -> Undo:
        return self

    def __exit__(self, failed: type[BaseException] | None, *_: object) -> None:
        for path in self.made if failed else []:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                path.unlink()


def check_paths(inputs: Iterable[tuple[str, str | os.PathLike]], outputs: Iterable[Output]) -> None:
    """Refuse, in one line naming the flags, an output that would overlap an input or an
    artefact of another kind (the module docstring states the rule)."""
    ins = [
        (flag, Path(p), _real(p))
        for flag, p in inputs
        if str(p) not in ("", "-") and not str(p).startswith("hf:")
    ]
    for out in outputs:
        given = Path(out.path)
        real = _real(given)
        where = f"{out.flag} {given}"
        if real == Path(real.anchor) or real == _real(Path.home()):
            raise BertforgeError(
                f"{where}: refusing to write into {real} itself; give a directory of its own"
            )
        refuse_link(given, where)
        for flag, path, source in ins:
            inside = source in real.parents
            if inside and kind_of(source) in out.home:
                continue  # a run's own report
            if real == source or inside or real in source.parents:
                how = "is" if real == source else "lies inside" if inside else "contains"
                raise BertforgeError(
                    f"{where} {how} the input {flag} {path}; an output "
                    f"must not overlap what the command reads"
                )
        for parent in real.parents:
            found = kind_of(parent)
            if found is not None and found not in out.home:
                raise BertforgeError(
                    f"{where} lies inside {parent}, {_a(found)} directory; choose a path outside it"
                )
        if out.kind == "file":
            if real.is_dir():
                raise BertforgeError(f"{where} is a directory; give a file name")
            continue
        if real.exists() and not real.is_dir():
            raise BertforgeError(f"{where} exists and is not a directory")
        found = kind_of(real) if real.is_dir() else None
        if found is not None and found != out.kind:
            raise BertforgeError(
                f"{where} is {_a(found)} directory, not {_a(out.kind)} "
                f"directory; choose another {out.flag}"
            )
        if found is None and real.is_dir() and any(p.name not in _OURS for p in real.iterdir()):
            raise BertforgeError(
                f"{where} is a directory holding files bertforge did not "
                f"write; give a new or empty directory"
            )


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _real(path: str | os.PathLike) -> Path:
    """`path` made absolute with every symbolic link in it resolved (as far as it exists)."""
    return Path(os.path.realpath(Path(path).expanduser()))
