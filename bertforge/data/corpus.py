"""Read documents from corpus files, streaming, one document at a time.

A corpus is a list of files, directories (walked recursively, hidden entries skipped)
and globs. Formats are told apart per file:

- ``.jsonl`` / ``.json``: one JSON object per line; the document is its ``text`` field.
- WikiExtractor output (first non-empty line starts with ``<doc ``): each
  ``<doc ...>`` ... ``</doc>`` block is one document, without the tags and without the
  title line WikiExtractor repeats under the opening tag.
- anything else: plain text, documents separated by blank lines.

Any of them may be gzipped (``.gz``). Bytes are decoded as UTF-8 with invalid sequences
replaced by U+FFFD; the replacements, skipped lines and empty documents are counted in
`CorpusStats` rather than raised, because one bad byte in a 10 GB dump should not stop
a run, but the user should hear about it.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bertforge.errors import BertforgeError

JSON_SUFFIXES = (".jsonl", ".json")
REPLACEMENT = "\ufffd"
_ENCODED_REPLACEMENT = REPLACEMENT.encode("utf-8")


@dataclass
class CorpusStats:
    """What reading a corpus found; filled in by `iter_documents` as it goes."""

    files: int = 0
    documents: int = 0
    bytes: int = 0  # uncompressed bytes read
    empty_documents: int = 0  # documents with nothing left after stripping (skipped)
    decode_errors: int = 0  # characters replaced by U+FFFD while decoding
    bad_lines: int = 0  # JSON lines that did not parse or lacked the text field

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def problems(self) -> str:
        """What was replaced or skipped, for the user ("" when nothing was)."""
        counts = {"undecodable characters replaced": self.decode_errors,
                  "bad JSON lines skipped": self.bad_lines,
                  "empty documents skipped": self.empty_documents}
        return ", ".join(f"{n:,} {what}" for what, n in counts.items() if n)


def resolve_corpus(specs: Iterable[str | os.PathLike]) -> list[Path]:
    """The files named by `specs` (files, directories, globs), in a deterministic order.

    Specs keep their order; the files of one directory or glob are sorted. A file named
    twice is kept at its first place only.
    """
    specs = [str(s) for s in specs]
    if not specs:
        raise BertforgeError("no corpus given")
    seen: set[Path] = set()
    files: list[Path] = []
    for spec in specs:
        for path in _expand(spec):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def _expand(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(_walk(path))
        if not found:
            raise BertforgeError(f"corpus directory has no files: {spec}")
        return found
    if glob.has_magic(spec):
        found = set()
        for match in glob.glob(os.path.expanduser(spec), recursive=True):
            p = Path(match)
            found.update([p] if p.is_file() else _walk(p) if p.is_dir() else [])
        if not found:
            raise BertforgeError(f"no corpus files match {spec}")
        return sorted(found)
    if path.exists():
        raise BertforgeError(f"corpus path is not a file or directory: {spec}")
    raise BertforgeError(f"corpus path not found: {spec}")


def _walk(root: Path) -> Iterator[Path]:
    """Regular files under `root`, skipping hidden files and hidden directories (.git...)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                p = Path(dirpath, name)
                if p.is_file():
                    yield p


def iter_documents(paths: Iterable[str | os.PathLike], stats: CorpusStats | None = None,
                   text_field: str = "text") -> Iterator[str]:
    """Yield the documents of `paths` as stripped, non-empty strings.

    Streams line by line, so memory does not grow with file size. `stats`, if given,
    is updated in place as documents are yielded.
    """
    stats = stats if stats is not None else CorpusStats()
    for path in paths:
        path = Path(path)
        stats.files += 1
        lines = _decoded_lines(path, stats)
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        if name.lower().endswith(JSON_SUFFIXES):
            raw = _json_documents(lines, text_field, stats)
        else:
            first, lines = _peek_content(lines)
            if first is not None and first.startswith("<doc "):
                raw = _wiki_documents(lines, stats)
            else:
                raw = _plain_documents(lines)
        for doc in raw:
            doc = doc.strip()
            if doc:
                stats.documents += 1
                yield doc
            else:
                stats.empty_documents += 1


def _open(path: Path) -> BinaryIO:
    try:
        if path.name.endswith(".gz"):
            return gzip.open(path, "rb")  # type: ignore[return-value]
        return open(path, "rb")
    except FileNotFoundError:
        raise BertforgeError(f"corpus file not found: {path}") from None
    except OSError as e:
        raise BertforgeError(f"cannot read corpus file {path}: {e.strerror or e}") from None


def _decoded_lines(path: Path, stats: CorpusStats) -> Iterator[str]:
    """The lines of `path` without line endings (LF or CRLF), decoded leniently.

    Splitting bytes at b"\\n" is safe for UTF-8: the byte 0x0A never occurs inside a
    multi-byte character, so each line decodes on its own.
    """
    with _open(path) as f:
        first = True
        try:
            for raw in f:
                stats.bytes += len(raw)
                line = raw.decode("utf-8", errors="replace")
                if REPLACEMENT in line:
                    # Count only the replacements decoding introduced, not U+FFFD in the text.
                    stats.decode_errors += line.count(REPLACEMENT) - raw.count(_ENCODED_REPLACEMENT)
                if first:
                    line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
                    first = False
                yield line.rstrip("\r\n")
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            raise BertforgeError(f"cannot read corpus file {path}: {e}") from None


def _peek_content(lines: Iterator[str]) -> tuple[str | None, Iterator[str]]:
    """The first non-blank line, and an iterator that still yields every line."""
    skipped: list[str] = []
    for line in lines:
        skipped.append(line)
        if line.strip():
            return line, _chain(skipped, lines)
    return None, iter(skipped)


def _chain(head: list[str], tail: Iterator[str]) -> Iterator[str]:
    yield from head
    yield from tail


def _plain_documents(lines: Iterator[str]) -> Iterator[str]:
    doc: list[str] = []
    for line in lines:
        if line.strip():
            doc.append(line)
        elif doc:
            yield "\n".join(doc)
            doc = []
    if doc:
        yield "\n".join(doc)


def _json_documents(lines: Iterator[str], text_field: str, stats: CorpusStats) -> Iterator[str]:
    for line in lines:
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except ValueError:
            stats.bad_lines += 1
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if isinstance(text, str):
            yield text
        else:
            stats.bad_lines += 1


def _wiki_documents(lines: Iterator[str], stats: CorpusStats) -> Iterator[str]:
    """WikiExtractor blocks; blank lines inside a block do not split it."""
    doc: list[str] | None = None  # None: outside any <doc>
    title_pending = False
    for line in lines:
        if line.startswith("<doc ") or line.rstrip() == "<doc>":
            if doc is not None:  # an unclosed block: keep what it had
                yield "\n".join(doc)
            doc, title_pending = [], True
        elif line.strip() == "</doc>":
            if doc is not None:
                yield "\n".join(doc)
            doc = None
        elif doc is None:
            if line.strip():
                stats.bad_lines += 1  # stray text between blocks
        elif title_pending:
            title_pending = False  # WikiExtractor repeats the title here; drop it
        else:
            doc.append(line)
    if doc is not None:  # a truncated file: keep the last block
        yield "\n".join(doc)
