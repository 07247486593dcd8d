"""Low-level corpus reading: opening, decoding, cleaning and cutting, and one document
parser per format (`bertforge.data.corpus` picks the parser by file name).

The formats (JSON lines, CSV, TSV, Parquet, ``hf:`` datasets, WikiExtractor output, plain
text) and their options are in docs/data.md#corpus-formats. Each repair (invalid UTF-8,
control characters, CR line ends) is counted in `CorpusStats`. Memory stays bounded
whatever the input: files are read in blocks of `BLOCK_BYTES`, a line or document longer
than `CorpusOptions.max_document_chars` is cut into pieces, and a JSON/CSV record longer
than `CorpusOptions.max_record_chars` is skipped. A source that cannot be parsed at all
(no text column, a bad CSV header) raises `_Unreadable`.

`CorpusOptions` and `CorpusStats` are defined here so that this module needs nothing
from `bertforge.data.corpus`, which re-exports them.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import dataclasses
import gzip
import importlib
import itertools
import json
import lzma
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bertforge.errors import BertforgeError

REPLACEMENT = "\ufffd"
_ENCODED_REPLACEMENT = REPLACEMENT.encode("utf-8")
BLOCK_BYTES = 1 << 19  # raw bytes read per call; below the line limit, so that only the
# first line of a block (the end of the previous one) can be too long
_CUT_WINDOW = 4096  # a long line is cut at the last whitespace this close to the limit
QUOTE_CHARS = 60  # file content quoted in a message or warning is cut to this length

# C0 controls but tab and newline, DEL and C1 controls. CR is gone by then (a line end).
# Vertical tab and form feed separate words, so they become spaces; the rest go.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_TABLE: dict[int, str | None] = {
    c: None for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]
}
_CONTROL_TABLE.update({0x0B: " ", 0x0C: " "})
# Lone surrogates come only from JSON "\ud800" escapes; they cannot be encoded as UTF-8.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@dataclass
class CorpusOptions:
    """How to read a corpus (the CLI's --text-field, --text-column, --one-doc-per-line,
    --dedup)."""

    text_field: str = "text"  # JSONL: the field that holds the document
    text_column: str = "text"  # CSV, TSV, Parquet, hf: the column that holds the document
    one_doc_per_line: bool = False  # plain text (not WikiExtractor): a document per line
    dedup: bool = False  # drop exact duplicates (an 8-byte hash per distinct document kept)
    max_document_chars: int = 1_000_000  # longer lines and documents are cut into pieces
    max_record_chars: int = 64_000_000  # longer JSONL/CSV lines are skipped (and counted)


@dataclass
class CorpusStats:
    """What reading a corpus found; filled in by `iter_documents` as it goes."""

    files: int = 0  # files (and hf datasets) opened
    documents: int = 0
    bytes: int = 0  # uncompressed bytes read (text bytes for Parquet and hf)
    empty_documents: int = 0  # documents with nothing left after stripping (skipped)
    decode_errors: int = 0  # characters replaced by U+FFFD (invalid UTF-8, lone surrogates)
    bad_lines: int = 0  # records that did not parse or lacked the text field/column (skipped)
    control_chars: int = 0  # control characters removed (NUL, ESC, ...; not tab or newline)
    duplicate_documents: int = 0  # exact repeats dropped by --dedup
    long_lines: int = 0  # lines over max_document_chars, cut into pieces
    split_documents: int = 0  # documents over max_document_chars, split into several
    oversized_records: int = 0  # JSONL/CSV lines over max_record_chars (skipped)
    unreadable_files: int = 0  # files skipped because they could not be read
    unreadable: list[str] = field(default_factory=list)  # "path: why", the first 100
    formats: dict[str, int] = field(default_factory=dict)  # files per format: {"jsonl.gz": 2}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def problems(self) -> str:
        """What was repaired or skipped, for the user ("" when nothing was)."""
        counts = [
            (self.decode_errors, "undecodable character{s} replaced"),
            (self.control_chars, "control character{s} removed"),
            (self.bad_lines, "bad record{s} skipped"),
            (self.oversized_records, "oversized record{s} skipped"),
            (self.empty_documents, "empty document{s} skipped"),
            (self.duplicate_documents, "duplicate document{s} dropped"),
            (self.long_lines, "long line{s} cut into pieces"),
            (self.split_documents, "long document{s} split"),
            (self.unreadable_files, "unreadable file{s} skipped"),
        ]
        return ", ".join(
            f"{n:,} " + what.format(s="" if n == 1 else "s") for n, what in counts if n
        )

    def summary_lines(self, max_named: int = 10) -> list[str]:
        """A few lines for the end of a command: files per format, documents, what was
        repaired or skipped, and the unreadable files by name."""
        formats = ", ".join(f"{n:,} {fmt}" for fmt, n in sorted(self.formats.items()))
        lines = [
            f"corpus: {self.files:,} file{'' if self.files == 1 else 's'} "
            f"({formats or 'none'}), {self.documents:,} "
            f"documents, {self.bytes / 1e6:,.1f} MB"
        ]
        if self.problems():
            lines.append(f"corpus: {self.problems()}")
        for entry in self.unreadable[:max_named]:
            lines.append(f"corpus: unreadable, skipped: {entry}")
        if self.unreadable_files > max_named:
            lines.append(
                f"corpus: ... and {self.unreadable_files - max_named:,} more unreadable files"
            )
        return lines


def _require(module: str, extra: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise BertforgeError(
            f"reading {what} needs the {package} package: pip install 'bertforge[{extra}]'"
        ) from None


class _Unreadable(Exception):
    """A source that cannot be read (its reason); it is skipped, named and counted."""


def _reason(e: BaseException) -> str:
    """Why reading failed, in one line: a library's message may quote the file's bytes."""
    text = (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0]
    return quote(text, 200)


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """File content (or a message that repeats it) fit for one line of a message: cut to
    `limit` characters, and every character that is not printable (ESC, which drives the
    terminal, newlines, bidi overrides) written as its escape, so that hostile bytes can
    neither flood nor forge what the user reads."""
    cut = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[:limit]
    )
    return cut + "..." if len(text) > limit else cut


def _open(path: Path, compression: str) -> BinaryIO:
    if compression == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if compression == ".bz2":
        return bz2.open(path, "rb")  # type: ignore[return-value]
    if compression == ".xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    if compression == ".zst":
        zstd = _require("zstandard", "formats", path.name)
        # A large window for files made with `zstd --long`; frames may be concatenated.
        return zstd.ZstdDecompressor(max_window_size=2**31).stream_reader(
            open(path, "rb"), read_across_frames=True, closefd=True
        )
    return open(path, "rb")


def _lines(f: BinaryIO, stats: CorpusStats, limit: int, skip_long: bool) -> Iterator[str]:
    """The lines of `f` without line endings (LF, CRLF or a lone CR), decoded leniently
    and cleaned of control characters, read in blocks of BLOCK_BYTES.

    A line longer than `limit` bytes is skipped (`skip_long`: a record that cannot be
    parsed in pieces) or yielded as pieces of at most `limit` bytes, cut after the last
    whitespace near the limit, else at the limit but never inside a multi-byte
    character. Lines split from bytes decode on their own (0x0A never occurs inside a
    multi-byte character); a block is checked for control characters as a whole, so
    clean text pays nothing per line for it.
    """
    carry = b""  # the unfinished last line
    carry_dirty = False  # the block `carry` came from had control characters
    held_cr = False  # a block ended in CR: it may be the first half of CRLF
    skipping = False  # inside a line already found too long (skip_long)
    continued = False  # `carry` is the rest of a long line already cut (not skip_long)
    start = True
    while True:
        raw = f.read(BLOCK_BYTES)
        final = not raw
        stats.bytes += len(raw)
        if start and raw:
            raw, start = raw.removeprefix(codecs.BOM_UTF8), False
        if held_cr:
            raw, held_cr = b"\r" + raw, False
        if b"\r" in raw:
            if raw.endswith(b"\r") and not final:
                raw, held_cr = raw[:-1], True
            raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if skipping:
            end = raw.find(b"\n")
            if end < 0:
                if final:
                    return
                continue
            raw, skipping = raw[end + 1 :], False
        dirty = carry_dirty or _has_control(raw)
        parts = raw.split(b"\n")
        if carry:
            parts[0] = carry + parts[0]
        carry, carry_dirty = parts.pop(), dirty  # carry: b"" when the block ended in "\n"
        if final and carry:
            parts.append(carry)
            carry = b""
        if parts:
            if (len(parts[0]) > limit or len(raw) > limit) and max(map(len, parts)) > limit:
                parts = list(_fit(parts, stats, limit, skip_long, continued))
            continued = False
            lines = [_decode_counting(part, stats) for part in parts]
            yield from ([_clean(line, stats) for line in lines] if dirty else lines)
        if len(carry) > limit:
            if skip_long:
                stats.oversized_records += 1
                carry, skipping = b"", True
            else:
                stats.long_lines += not continued
                continued = True
                pieces = list(_split_bytes(carry, limit))
                carry = pieces.pop()  # the line may go on in the next block
                for piece in pieces:
                    yield _decode(piece, stats)
        if final:
            return


def _decode_counting(data: bytes, stats: CorpusStats) -> str:
    """UTF-8 with invalid bytes replaced by U+FFFD, each replacement counted in `stats`:
    the U+FFFD of the result less those the bytes already held (EF BF BD, which always
    decodes to one U+FFFD: EF never continues another sequence)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", "replace")
        stats.decode_errors += text.count(REPLACEMENT) - data.count(_ENCODED_REPLACEMENT)
        return text


def _decode(data: bytes, stats: CorpusStats) -> str:
    """UTF-8 with invalid bytes replaced by U+FFFD and control characters removed, both
    counted."""
    text = _decode_counting(data, stats)
    return _clean(text, stats) if _has_control(data) else text


def _has_control(data: bytes) -> bool:
    """Whether UTF-8 `data` may hold a control character that `_clean` removes: a byte
    below 0x20 other than tab and newline, DEL, or C1 (0xC2 then 0x80-0x9F). numpy
    compares take a twentieth of the time of a character-class regex over the block."""
    a = np.frombuffer(data, dtype=np.uint8)
    if ((a < 0x20) & (a != 0x09) & (a != 0x0A)).any() or (a == 0x7F).any():
        return True
    if b"\xc2" not in data:
        return False
    lead = np.flatnonzero(a[:-1] == 0xC2)
    return bool((a[lead + 1] < 0xA0).any())


def _fit(
    parts: list[bytes], stats: CorpusStats, limit: int, skip_long: bool, continued: bool
) -> Iterator[bytes]:
    """`parts`, each one over `limit` bytes skipped or cut into pieces (`continued`: the
    first is the end of a long line already counted)."""
    for i, part in enumerate(parts):
        if len(part) <= limit:
            yield part
        elif skip_long:
            stats.oversized_records += 1
        else:
            stats.long_lines += not (i == 0 and continued)
            yield from _split_bytes(part, limit)


def _split_bytes(data: bytes, limit: int) -> Iterator[bytes]:
    """UTF-8 `data` in pieces of at most `limit` bytes, each ending after whitespace near
    the limit where there is some, and never inside a multi-byte character."""
    pos = 0
    while len(data) - pos > limit:
        lo, hi = pos + max(limit - _CUT_WINDOW, 1), pos + limit
        cut = max(data.rfind(b" ", lo, hi), data.rfind(b"\t", lo, hi))
        if cut >= 0:
            cut += 1
        else:
            cut = hi
            while cut > pos + 1 and data[cut] & 0xC0 == 0x80:  # a continuation byte
                cut -= 1
        yield data[pos:cut]
        pos = cut
    yield data[pos:]


def _cut_point(text: str, pos: int, limit: int) -> int:
    """Where a piece of `text` that starts at `pos` ends, at most `limit` characters on:
    after the last whitespace within _CUT_WINDOW of the limit, else at the limit."""
    lo, hi = pos + max(limit - _CUT_WINDOW, 1), pos + limit
    cut = max(text.rfind(" ", lo, hi), text.rfind("\n", lo, hi), text.rfind("\t", lo, hi))
    return cut + 1 if cut >= 0 else hi


def _split_text(text: str, limit: int) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters (by index: slicing off the rest each
    time would copy a 60 MB record once per piece)."""
    pos = 0
    while len(text) - pos > limit:
        cut = _cut_point(text, pos, limit)
        yield text[pos:cut]
        pos = cut
    yield text[pos:]


def _clean(text: str, stats: CorpusStats) -> str:
    """Control characters and lone surrogates out of text that was not decoded here."""
    if _CONTROL_RE.search(text):
        stats.control_chars += len(_CONTROL_RE.findall(text))
        text = text.translate(_CONTROL_TABLE)
    if _SURROGATE_RE.search(text):
        stats.decode_errors += len(_SURROGATE_RE.findall(text))
        text = _SURROGATE_RE.sub(REPLACEMENT, text)
    return text


def _peek_content(lines: Iterator[str]) -> tuple[str | None, Iterator[str]]:
    """The first non-blank line, and an iterator that still yields every line."""
    skipped: list[str] = []
    for line in lines:
        skipped.append(line)
        if line.strip():
            return line, itertools.chain(skipped, lines)
    return None, iter(skipped)


def _plain_documents(lines: Iterator[str], stats: CorpusStats, limit: int) -> Iterator[str]:
    """Blank-line separated documents; one reaching `limit` characters is cut there."""
    doc: list[str] = []
    size = 0
    split = False
    for line in lines:
        if line and not line.isspace():
            if doc and size + len(line) > limit:
                yield "\n".join(doc)
                doc, size = [], 0
                stats.split_documents += not split
                split = True
            doc.append(line)
            size += len(line) + 1
        elif doc:
            yield "\n".join(doc)
            doc, size, split = [], 0, False
    if doc:
        yield "\n".join(doc)


def _json_documents(lines: Iterator[str], text_field: str, stats: CorpusStats) -> Iterator[str]:
    for line in lines:
        if not line or line.isspace():
            continue
        try:
            record: Any = json.loads(line)
        except (ValueError, RecursionError):  # deep nesting raises RecursionError
            stats.bad_lines += 1
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if isinstance(text, str):
            yield _clean(text, stats)
        else:
            stats.bad_lines += 1


def _csv_documents(
    lines: Iterator[str], fmt: str, stats: CorpusStats, options: CorpusOptions
) -> Iterator[str]:
    """The text column of each row; rows that do not parse or lack it are counted."""
    if fmt == "tsv":
        dialect: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    else:
        dialect = {"delimiter": ","}
    # The limit bounds a quoted field that runs across lines (an unclosed quote).
    # It is process-wide, so it is put back when this file is done.
    old_limit = csv.field_size_limit(options.max_record_chars)
    try:
        reader = csv.reader((line + "\n" for line in lines), **dialect)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise _Unreadable(f"bad CSV header ({quote(str(e))})") from None
        if header is None:
            return
        header = [h.strip() for h in header]
        if options.text_column not in header:
            raise _Unreadable(
                f"no column {options.text_column!r} (columns: "
                f"{quote(', '.join(header[:20]))}); choose one with --text-column"
            )
        index = header.index(options.text_column)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error:  # the reader starts afresh on the next line
                stats.bad_lines += 1
                continue
            if not row:
                continue
            if index < len(row):
                yield row[index]
            else:
                stats.bad_lines += 1
    finally:
        csv.field_size_limit(old_limit)


def _parquet_documents(
    path: Path, compression: str, stats: CorpusStats, options: CorpusOptions
) -> Iterator[str]:
    """The text column, a record batch at a time (memory: one row group's column)."""
    pq = _require("pyarrow.parquet", "formats", path.name)
    import pyarrow as pa
    import pyarrow.compute as pc

    with _seekable(path, compression) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        column = options.text_column
        if column not in schema.names:
            raise _Unreadable(
                f"no column {column!r} (columns: "
                f"{quote(', '.join(schema.names[:20]))}); choose one with "
                f"--text-column"
            )
        typ = schema.field(column).type
        text_types = (
            pa.types.is_string(typ)
            or pa.types.is_large_string(typ)
            or pa.types.is_binary(typ)
            or pa.types.is_large_binary(typ)
        )
        if not text_types:
            raise _Unreadable(f"column {column!r} holds {typ}, not text")
        for batch in pf.iter_batches(batch_size=1024, columns=[column]):
            values = batch.column(0)
            stats.bytes += pc.sum(pc.binary_length(values)).as_py() or 0
            for value in values.to_pylist():
                if value is None:
                    yield ""  # counted as an empty document
                    continue
                if isinstance(value, bytes):
                    value = _decode_counting(value, stats)
                yield _clean(value, stats)


def _seekable(path: Path, compression: str) -> BinaryIO:
    """Parquet needs to seek: a compressed file is inflated into a temporary file first."""
    if not compression:
        return open(path, "rb")
    tmp = tempfile.TemporaryFile()
    try:
        with _open(path, compression) as src:
            shutil.copyfileobj(src, tmp, BLOCK_BYTES)
        tmp.seek(0)
    except BaseException:
        tmp.close()
        raise
    return tmp


def _hf_documents(
    spec: str, name: str, config: str | None, stats: CorpusStats, options: CorpusOptions
) -> Iterator[str]:
    """The train split of Hub dataset `name` (`config`; `spec` names it in messages),
    streamed. Any failure of the datasets library (network, missing dataset, bad config)
    makes the source unreadable, not the run."""
    datasets = _require("datasets", "datasets", spec)
    try:
        rows = iter(datasets.load_dataset(name, config, split="train", streaming=True))
    except Exception as e:  # the datasets library raises many unrelated types
        raise _Unreadable(_reason(e)) from None
    column = options.text_column
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise _Unreadable(_reason(e)) from None
        text = row.get(column) if isinstance(row, dict) else None
        if isinstance(text, str):
            stats.bytes += len(text.encode("utf-8", errors="surrogatepass"))
            yield _clean(text, stats)
        else:
            stats.bad_lines += 1


def _wiki_documents(lines: Iterator[str], stats: CorpusStats, limit: int) -> Iterator[str]:
    """WikiExtractor blocks; blank lines inside a block do not split it; a block reaching
    `limit` characters is cut there."""
    doc: list[str] | None = None  # None: outside any <doc>
    size = 0
    split = False
    title_pending = False
    for line in lines:
        if line[:1] in "< \t":  # the tags are checked only where they can be (also "")
            if line.startswith("<doc ") or line.rstrip() == "<doc>":
                if doc is not None:  # an unclosed block: keep what it had
                    yield "\n".join(doc)
                doc, size, split, title_pending = [], 0, False, True
                continue
            if line.strip() == "</doc>":
                if doc is not None:
                    yield "\n".join(doc)
                doc = None
                continue
        if doc is None:
            if line.strip():
                stats.bad_lines += 1  # stray text between blocks
        elif title_pending:
            title_pending = False  # WikiExtractor repeats the title here; drop it
        else:
            n = len(line)
            if size + n > limit and doc:
                yield "\n".join(doc)
                doc, size = [], 0
                stats.split_documents += not split
                split = True
            doc.append(line)
            size += n + 1
    if doc is not None:  # a truncated file: keep the last block
        yield "\n".join(doc)
