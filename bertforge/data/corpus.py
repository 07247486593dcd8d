"""Find the files of a corpus and stream their documents, one at a time.

`resolve_corpus` turns files, directories (walked recursively, hidden entries skipped,
each real directory entered once, so a symlink loop ends), globs and ``hf:NAME[:CONFIG]``
datasets into a deterministic list of sources; `file_format` tells a file's format by its
name, and `bertforge.data.readers` parses it. `iter_documents` strips documents, drops
empty ones and (optionally) exact duplicates, splits over-long ones, and with
`sample_bytes` reads only about that many bytes, spread over the sources by their size.
Dirty input never stops a run and is never passed over in silence: every repair is
counted in `CorpusStats`, and an unreadable file is skipped and named (docs/data.md).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import logging
import lzma
import os
import re
import sys
import zlib
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path

from bertforge.data.readers import (
    CorpusOptions,
    CorpusStats,
    _csv_documents,
    _hf_documents,
    _json_documents,
    _lines,
    _open,
    _parquet_documents,
    _peek_content,
    _plain_documents,
    _reason,
    _require,
    _split_text,
    _Unreadable,
    _wiki_documents,
)
from bertforge.errors import BertforgeError

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
HF_PREFIX = "hf:"
_NAMED_UNREADABLE = 100  # unreadable files named in the stats (all are counted)
_HF_SPEC = re.compile(r"hf:([\w.-]+(?:/[\w.-]+)?)(?::([\w.-]+))?")


def resolve_corpus(specs: Iterable[str | os.PathLike]) -> list[Path | str]:
    """The files named by `specs` (files, directories, globs), in a deterministic order.

    Specs keep their order; the files of one directory or glob are sorted. A file named
    twice is kept at its first place only. ``hf:NAME[:CONFIG]`` specs are checked and kept
    as strings. Fails early when a format's optional package is missing.
    """
    names = [str(s) for s in specs]
    if not names:
        raise BertforgeError("no corpus given")
    seen: set[Path | str] = set()
    files: list[Path | str] = []
    for spec in names:
        if spec.startswith(HF_PREFIX):
            parse_hf_spec(spec)
            _require("datasets", "datasets", spec)
            found: list[Path | str] = [spec]
        else:
            found = list(_expand(spec))
        for path in found:
            key = path if isinstance(path, str) else path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    for path in files:
        if isinstance(path, Path):
            fmt, compression = file_format(path)
            if fmt == "parquet":
                _require("pyarrow.parquet", "formats", path.name)
            if compression == ".zst":
                _require("zstandard", "formats", path.name)
    return files


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """'hf:NAME[:CONFIG]' -> (NAME, CONFIG or None)."""
    m = _HF_SPEC.fullmatch(spec)
    if not m:
        raise BertforgeError(
            f"bad corpus spec {spec!r}: expected hf:NAME or hf:NAME:CONFIG "
            "(e.g. hf:wikitext:wikitext-103-raw-v1)"
        )
    return m.group(1), m.group(2)


def file_format(path: Path) -> tuple[str, str]:
    """(format, compression suffix or ""): format is jsonl, csv, tsv, parquet or text."""
    name = path.name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    name = name[: len(name) - len(compression)]
    if name.endswith(JSON_SUFFIXES):
        return "jsonl", compression
    for fmt in ("csv", "tsv", "parquet"):
        if name.endswith("." + fmt):
            return fmt, compression
    return "text", compression


def estimate_bytes(sources: list[Path | str]) -> int | None:
    """About how many bytes `iter_documents` will count in `stats.bytes`, for a progress
    bar; None with an hf dataset. Exact for plain files and gzip files under 4 GB (their
    trailer holds the size mod 2**32); other compressed files count 4x their size
    (typical for text), Parquet 2x."""
    total = 0
    for source in sources:
        if isinstance(source, str) and source.startswith(HF_PREFIX):
            return None
        path = Path(source)
        try:
            size = path.stat().st_size
            fmt, compression = file_format(path)
            if compression == ".gz" and size >= 18:
                with open(path, "rb") as f:
                    f.seek(-4, os.SEEK_END)
                    isize = int.from_bytes(f.read(4), "little")
                # Deflate compresses at most ~1032:1; outside [size, 1032 * size] the
                # trailer is wrapped, from a multi-member file, or from a truncated one.
                total += isize if size <= isize <= 1032 * size else 4 * size
            elif compression or fmt == "parquet":
                total += (4 if compression else 2) * size
            else:
                total += size
        except OSError:
            pass  # unreadable: skipped (and named) when read
    return total


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
        matches = set(_glob(os.path.expanduser(spec)))
        if not matches:
            raise BertforgeError(f"no corpus files match {spec}")
        return sorted(matches)
    if path.exists():
        raise BertforgeError(f"corpus path is not a file or directory: {spec}")
    raise BertforgeError(f"corpus path not found: {spec}")


def _glob(pattern: str) -> Iterator[Path]:
    """The files `pattern` matches, and those under the directories it matches.

    A ``**`` component matches any number of directories. glob.glob would follow a
    symlink loop there until the path is too long (forever, with two loops), so such a
    pattern is matched against a `_walk` from the directory before its first wildcard.
    """
    parts = Path(pattern).parts
    if "**" not in parts:  # each component matches one level: no loop can be followed
        for match in glob.glob(pattern):
            p = Path(match)
            yield from [p] if p.is_file() else _walk(p) if p.is_dir() else []
        return
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base, wanted = Path(*parts[:first]), parts[first:]
    matched: set[Path] = set()  # directories that match: all their files are wanted
    for directory, names in _walk_dirs(base):
        rel = directory.relative_to(base).parts
        if directory.parent in matched or _matches(rel, wanted):
            matched.add(directory)
        for name in names:
            if directory in matched or _matches((*rel, name), wanted):
                yield directory / name


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether path `parts` match glob `pattern`, component by component ("**": any
    number of components)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return (
        bool(parts) and fnmatch.fnmatch(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])
    )


def _walk(root: Path) -> Iterator[Path]:
    """Regular files under `root`, skipping hidden files and hidden directories (.git...)."""
    for directory, names in _walk_dirs(root):
        yield from (directory / name for name in names)


def _walk_dirs(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """(directory, names of its regular files) for `root` and every directory under it,
    hidden ones skipped, in a fixed order. Symlinks are followed, but a directory already
    visited (by its real path) is not entered again: a symlink loop would repeat the
    files forty levels deep, or never end."""
    visited = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in visited:
                visited.add(real)
                keep.append(d)
        dirnames[:] = keep
        yield (
            Path(dirpath),
            [
                name
                for name in sorted(filenames)
                if not name.startswith(".") and os.path.isfile(os.path.join(dirpath, name))
            ],
        )


def iter_documents(
    sources: Iterable[str | os.PathLike],
    stats: CorpusStats | None = None,
    options: CorpusOptions | None = None,
    sample_bytes: int | None = None,
) -> Iterator[str]:
    """Yield the documents of `sources` (from `resolve_corpus`) as stripped, non-empty
    strings of at most `options.max_document_chars` characters.

    A longer document is split into several at whitespace near the limit, so memory does
    not grow with file size, line length or document length. `stats`, if given, is updated
    in place as documents are yielded. With `sample_bytes`, only about that many bytes of
    documents are yielded, spread over the sources by their on-disk size: each source
    gives its first documents, up to its share (see `_sample_targets`).
    """
    stats = stats if stats is not None else CorpusStats()
    options = options or CorpusOptions()
    sources = list(sources)
    limit = options.max_document_chars
    seen: set[int] | None = set() if options.dedup else None
    targets = _sample_targets(sources, sample_bytes) if sample_bytes is not None else None
    fed = 0  # document bytes yielded, when sampling
    for i, source in enumerate(sources):
        if targets is not None and fed >= targets[i]:
            continue
        stats.files += 1
        docs = _source_documents(source, stats, options)
        try:
            for doc in docs:
                doc = doc.strip()
                if not doc:
                    stats.empty_documents += 1
                    continue
                if len(doc) > limit:
                    stats.split_documents += 1
                    pieces: Iterable[str] = _split_text(doc, limit)
                else:
                    pieces = (doc,)
                for piece in pieces:
                    if seen is not None:
                        key = int.from_bytes(
                            hashlib.blake2b(piece.encode("utf-8"), digest_size=8).digest(), "little"
                        )
                        if key in seen:
                            stats.duplicate_documents += 1
                            continue
                        seen.add(key)
                    stats.documents += 1
                    yield piece
                    if targets is not None:
                        fed += len(piece.encode("utf-8"))
                if targets is not None and fed >= targets[i]:
                    break
        except _Unreadable as e:
            _skip(stats, source, str(e))
        except Exception as e:
            if not isinstance(e, _read_errors()):
                raise
            _skip(stats, source, _reason(e))
        finally:
            docs.close()
    if stats.files and stats.unreadable_files == stats.files and not stats.documents:
        raise BertforgeError(
            f"no corpus file could be read ({stats.unreadable_files:,} "
            f"unreadable; first: {stats.unreadable[0]})"
        )


def _skip(stats: CorpusStats, source: str | os.PathLike, reason: str) -> None:
    log.warning("skipping unreadable corpus file %s: %s", source, reason)
    stats.unreadable_files += 1
    if len(stats.unreadable) < _NAMED_UNREADABLE:
        stats.unreadable.append(f"{source}: {reason}")


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged or forbidden file raises (gzip.BadGzipFile is an OSError)."""
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error, lzma.LZMAError]
    if sys.modules.get("zstandard") is not None:
        errors.append(sys.modules["zstandard"].ZstdError)
    if sys.modules.get("pyarrow") is not None:
        errors.append(sys.modules["pyarrow"].lib.ArrowException)
    return tuple(errors)


def _sample_targets(sources: list[str | os.PathLike], sample_bytes: int) -> list[float]:
    """Cumulative byte targets: source i is read while the bytes yielded so far are below
    targets[i]. Shares follow on-disk sizes (a compressed file counts at its compressed
    size); an hf dataset counts as an average file."""
    sizes: list[float | None] = []
    for s in sources:
        try:
            sizes.append(None if str(s).startswith(HF_PREFIX) else max(os.path.getsize(s), 1))
        except OSError:
            sizes.append(1)
    known = [s for s in sizes if s is not None]
    fill = sum(known) / len(known) if known else 1.0
    total = sum(fill if s is None else s for s in sizes)
    targets, cum = [], 0.0
    for size in sizes:
        cum += fill if size is None else size
        targets.append(sample_bytes * cum / total)
    return targets


def _source_documents(
    source: str | os.PathLike, stats: CorpusStats, options: CorpusOptions
) -> Generator[str, None, None]:
    """The raw (unstripped) documents of one file or hf dataset."""
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        _count_format(stats, "hf")
        name, config = parse_hf_spec(source)
        yield from _hf_documents(source, name, config, stats, options)
        return
    path = Path(source)
    fmt, compression = file_format(path)
    _count_format(stats, fmt + compression)
    if fmt == "parquet":
        yield from _parquet_documents(path, compression, stats, options)
        return
    with _open(path, compression) as f:
        if fmt == "jsonl":
            lines = _lines(f, stats, options.max_record_chars, skip_long=True)
            yield from _json_documents(lines, options.text_field, stats)
        elif fmt in ("csv", "tsv"):
            lines = _lines(f, stats, options.max_record_chars, skip_long=True)
            yield from _csv_documents(lines, fmt, stats, options)
        else:
            lines = _lines(f, stats, options.max_document_chars, skip_long=False)
            first, lines = _peek_content(lines)
            if first is not None and first.startswith("<doc "):
                _count_format(stats, fmt + compression, -1)
                _count_format(stats, "wikiextractor" + compression)
                yield from _wiki_documents(lines, stats, options.max_document_chars)
            elif options.one_doc_per_line:
                yield from (line for line in lines if line and not line.isspace())
            else:
                yield from _plain_documents(lines, stats, options.max_document_chars)


def _count_format(stats: CorpusStats, key: str, n: int = 1) -> None:
    stats.formats[key] = stats.formats.get(key, 0) + n
    if not stats.formats[key]:
        del stats.formats[key]


def batched(docs: Iterator[str], max_chars: int, max_documents: int) -> Iterator[list[str]]:
    """Documents in lists of at most `max_documents` and about `max_chars` characters: the
    unit a tokenizer is handed, so that memory stays bounded however large the corpus."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= max_chars or len(batch) >= max_documents:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
