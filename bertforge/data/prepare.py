"""Tokenize a corpus once into fixed-length token shards plus a manifest (`prepare`), and
read a data directory's manifest back, checked (`load_manifest`).

Layout of a data directory::

    manifest.json                 what is here and how it was made (written last)
    tokenizer/                    a copy of the tokenizer, so the directory stands alone
    train-00000.bin ...           raw C-order arrays (sequences, seq_len), uint16 or uint32
    valid-00000.bin ...
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from bertforge.config import DOCUMENT_BOUNDARIES
from bertforge.data.corpus import (
    CorpusOptions,
    CorpusStats,
    batched,
    estimate_bytes,
    iter_documents,
    resolve_corpus,
)
from bertforge.data.encode import available_cores, encode_batches
from bertforge.data.readers import quote
from bertforge.data.tokenizer import (
    copy_tokenizer,
    load_tokenizer,
    special_token_ids,
    tokenizer_hash,
)
from bertforge.errors import BertforgeError
from bertforge.fileio import alive, hold_lock, open_new, write_text_atomic
from bertforge.paths import replace_owned, require_owned

log = logging.getLogger(__name__)

FORMAT = "bertforge-shards"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid")
# Each shard's digest is recorded in the manifest and checked whenever a run opens the data
# (bertforge.data.loader.verify_data). sha256 rather than blake2b: with the SHA extensions
# of current x86 and ARM CPUs hashlib's sha256 is the faster (1.1 against 0.9 GB/s here),
# and checkpoints use it too.
SHARD_HASH = "sha256"
MIN_SEQ_LEN = 8
# A batch goes to a worker when it reaches either bound: large enough that handing it
# over costs little next to encoding it, small enough that the first batch (encoded
# before the other workers start) is short and that work spreads evenly.
_BATCH_CHARS = 250_000
_BATCH_DOCUMENTS = 8192


def prepare(
    corpus: list[str],
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seq_len: int = 128,
    valid_fraction: float = 0.01,
    shard_sequences: int = 65536,
    show_progress: bool = True,
    corpus_options: CorpusOptions | None = None,
    document_boundary: str = "cross",
    workers: int | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
) -> dict[str, Any]:
    """Tokenize `corpus` (files, directories, globs, hf: specs; read with
    `corpus_options`) into shards in `out_dir`.

    `document_boundary`: "cross" (documents joined by [SEP] across sequences) or "new"
    (each document starts a sequence). `workers`: tokenizing processes (default: every
    core). `num_shards`, `shard_index`: prepare only part `shard_index` of `num_shards`.
    Returns the manifest (also written to out_dir/manifest.json).

    - The validation split is chosen per document from a hash of its text, so it does not
      depend on file order or batch sizes, and exact duplicates never straddle the splits.
    - Each split is one token stream, documents joined by [SEP], cut into sequences
      ``[CLS] + (seq_len - 2) stream tokens + [SEP]`` (RoBERTa's "full-sentences" packing:
      no padding except in the last sequence of a split). A body never starts with the
      joining [SEP]; the previous sequence's closing [SEP] already marks the boundary.
      With ``document_boundary="new"`` each document starts a sequence instead, and its
      last one is ``[CLS] rest [SEP]`` padded with [PAD] (sequences never mix documents).
    - Text that spells a special token ("[MASK]") is tokenized as plain text, so special
      ids in the shards only ever come from packing.
    - Memory stays flat: documents stream in batches, `workers` processes tokenize them
      (bertforge.data.encode: a chunk cache in front of the Rust tokenizer, same ids), and
      sequences go to disk as they are cut. The shards do not depend on `workers`.
    - One corpus can be prepared on several machines: part i of n takes the documents whose
      ordinal in the corpus is i mod n (balanced to one document; the parts together are
      the corpus, each document once), and is a complete data directory whose manifest
      names the part. `pretrain --data DIR --data DIR ...` reads the parts as one dataset.
    - Everything is written into a hidden sibling directory that is renamed into place at
      the end, so a killed run never leaves a manifest that points at partial shards. A
      failed write (a full disk) removes it at once; those of killed runs are removed by the
      next prepare of the same output (never those of a process still alive).
    - The manifest records each shard's sha256, computed as it is written; runs check the
      shards against it, and their token ids against the vocabulary, when they open the data
      (bertforge.data.loader.verify_data). `load_manifest` checks every field's type, so a
      damaged or hostile manifest is refused in one short line.
    """
    if seq_len < MIN_SEQ_LEN:
        raise BertforgeError(f"seq_len {seq_len} is too short (minimum {MIN_SEQ_LEN})")
    if not 0.0 <= valid_fraction < 1.0:
        raise BertforgeError(f"valid_fraction {valid_fraction} must be in [0, 1)")
    if shard_sequences < 1:
        raise BertforgeError(f"shard_sequences {shard_sequences} must be >= 1")
    if document_boundary not in DOCUMENT_BOUNDARIES:
        raise BertforgeError(
            f"document_boundary {document_boundary!r} must be one of "
            f"{', '.join(DOCUMENT_BOUNDARIES)}"
        )
    workers = available_cores() if workers is None else workers
    if workers < 1:
        raise BertforgeError(f"workers {workers} must be >= 1")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise BertforgeError(
            f"shard index {shard_index} of {num_shards} shards: need "
            f"num_shards >= 1 and 0 <= shard_index < num_shards"
        )
    start = time.perf_counter()
    tok = load_tokenizer(tokenizer_dir)
    tok.encode_special_tokens = True  # "[MASK]" in the text is text, not a mask
    specials = special_token_ids(tok)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)
    files = resolve_corpus(corpus)
    out = Path(out_dir).resolve()  # a real name for the sibling temp dir, even for "."
    # One prepare of `out` at a time: a second is refused, naming the first, instead of
    # both writing shards and renaming them over each other.
    with hold_lock(out.parent / f".{out.name}.lock", f"data directory {out}"):
        _check_out_dir(out)

        _remove_leftovers(out)
        tmp = _sibling(out, "partial")
        packers: dict[str, _Packer] = {}
        try:
            tmp.mkdir()  # not mkdtemp: that makes it private (0700), and it becomes `out`
            stats = CorpusStats()
            packers = {
                s: _Packer(
                    _ShardWriter(tmp, s, seq_len, dtype, shard_sequences),
                    specials,
                    document_boundary,
                )
                for s in SPLITS
            }
            # A bar on a terminal only: its carriage returns would fill a log file.
            bar = tqdm(
                total=_total_bytes(files),
                unit="B",
                unit_scale=True,
                desc="prepare",
                disable=not (show_progress and sys.stderr.isatty()),
                file=sys.stderr,
            )
            # Each split's latest document (its ids) is held back until the end (see _settle).
            pending: dict[str, np.ndarray | None] = {s: None for s in SPLITS}
            seen = 0
            docs = iter_documents(files, stats, corpus_options)
            if num_shards > 1:  # this part's documents: ordinal mod num_shards == shard_index
                docs = itertools.compress(
                    docs, itertools.cycle([k == shard_index for k in range(num_shards)])
                )
            batches = batched(docs, _BATCH_CHARS, _BATCH_DOCUMENTS)
            for enc in encode_batches(batches, tok, dtype, valid_fraction, workers):
                for split, chosen in (("train", ~enc.valid), ("valid", enc.valid)):
                    if not chosen.any():
                        continue
                    ids = enc.ids[np.repeat(chosen, enc.lengths)]  # (N,) these documents' tokens
                    lengths = enc.lengths[chosen]  # (D,)
                    held = pending[split]
                    if held is not None:
                        ids = np.concatenate([held, ids])
                        lengths = np.concatenate([[len(held)], lengths])
                    keep = len(ids) - int(lengths[-1])
                    pending[split] = ids[keep:].copy()
                    packers[split].add(ids[:keep], lengths[:-1])
                bar.update(stats.bytes - seen)
                seen = stats.bytes
            bar.close()

            if stats.documents == 0:
                found = f" ({stats.problems()})" if stats.problems() else ""
                raise BertforgeError(
                    f"corpus has no documents: {' '.join(map(str, corpus))}{found}"
                )
            if all(p is None for p in pending.values()):
                raise BertforgeError(
                    f"part {shard_index} of {num_shards} has no documents (the "
                    f"corpus has {stats.documents:,})"
                )
            _settle(pending, packers, valid_fraction)
            if valid_fraction > 0 and packers["valid"].documents == 0:
                log.warning("corpus has a single document: the validation split is empty")

            copy_tokenizer(tokenizer_dir, tmp / "tokenizer")
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "seq_len": seq_len,
                "dtype": dtype.name,
                "vocab_size": vocab_size,
                "tokenizer_hash": tokenizer_hash(tmp / "tokenizer"),
                "special_token_ids": specials,
                "valid_fraction": valid_fraction,
                "document_boundary": document_boundary,
                "part": {"index": shard_index, "count": num_shards},
                "corpus_files": [str(p) for p in files],
                "corpus_stats": stats.as_dict(),
                "splits": {s: packers[s].finish() for s in SPLITS},
                "elapsed_s": None,
            }
            elapsed = time.perf_counter() - start
            manifest["elapsed_s"] = round(elapsed, 3)
            write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
            replace_owned(tmp, out, "data")  # swapped in whole, over an earlier one
        except BaseException as e:
            for packer in packers.values():
                packer.writer.abandon()
            shutil.rmtree(tmp, ignore_errors=True)  # (the lock removes the empty parents)
            if isinstance(e, OSError):  # a full disk, a file size limit, a quota
                raise BertforgeError(
                    f"cannot write {out}: {e.strerror or e} (the partial output was removed)"
                ) from None
            raise

    if show_progress:
        _summary(manifest, stats, elapsed, Path(out_dir))  # the path as given, as elsewhere
    return manifest


def _settle(
    pending: dict[str, np.ndarray | None], packers: dict[str, _Packer], valid_fraction: float
) -> None:
    """Place each split's held-back last document, fixing up what hashing alone gets wrong
    on tiny corpora: train must never be empty, and valid should not be when asked for."""
    count = {s: packers[s].documents + (pending[s] is not None) for s in SPLITS}
    if count["train"] == 0:
        pending["train"], pending["valid"] = pending["valid"], None
    elif count["valid"] == 0 and valid_fraction > 0 and count["train"] > 1:
        pending["valid"], pending["train"] = pending["train"], None
    for split in SPLITS:
        ids = pending[split]
        if ids is not None:
            packers[split].add(ids, np.array([len(ids)]))


def _check_out_dir(out: Path) -> None:
    """Refuse to replace a directory that is not an earlier data directory."""
    if out.exists() and not out.is_dir():
        raise BertforgeError(f"output path exists and is not a directory: {out}")
    require_owned(out, "data")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BertforgeError(f"cannot create {out.parent}: {e.strerror or e}") from None


def _sibling(out: Path, kind: str) -> Path:
    """A fresh hidden path next to `out`, on the same filesystem so renames are atomic."""
    return out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def _remove_leftovers(out: Path) -> None:
    """Remove the `_sibling` directories of `out` that killed runs left behind: those named
    for a process that is no longer alive. A live one's may be mid-write, so it stays."""
    name = re.compile(re.escape(f".{out.name}.") + r"(\d+)-[0-9a-f]{8}\.(?:partial|old)")
    for entry in out.parent.iterdir():
        found = name.fullmatch(entry.name)
        if found and not entry.is_symlink() and entry.is_dir() and not alive(int(found[1])):
            shutil.rmtree(entry, ignore_errors=True)


def _total_bytes(files: list[Path | str]) -> int | None:
    """About how many bytes the corpus holds, for the progress bar (compressed files are
    estimated; unknown with an hf dataset)."""
    return estimate_bytes(files)


class _Packer:
    """Cuts one split's documents into [CLS] body [SEP] sequences as they come.

    "cross": one token stream, documents joined by [SEP], cut as it grows. "new": each
    document cut on its own, its last sequence padded.
    """

    def __init__(
        self, writer: _ShardWriter, specials: dict[str, int], document_boundary: str = "cross"
    ) -> None:
        self.writer = writer
        self.cls, self.sep, self.pad = specials["cls"], specials["sep"], specials["pad"]
        self.body = writer.seq_len - 2
        self.new_sequences = document_boundary == "new"
        self.buf = np.empty(0, dtype=writer.dtype)  # stream tokens not yet in a sequence
        self.documents = 0
        self.tokens = 0
        self.started = False  # whether the stream has a document yet (then [SEP] joins)

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: their token ids one after another (N,), and their lengths
        (D,); write every full sequence."""
        self.documents += len(lengths)
        self.tokens += len(ids)
        # A document with no tokens left (nothing survived normalisation) is skipped:
        # joining it would double a [SEP].
        lengths = lengths[lengths > 0]
        if not len(lengths):
            return
        if self.new_sequences:
            self._write_documents(ids, lengths)
            return
        joined = np.ones(len(lengths), dtype=np.int64)  # a [SEP] before each document...
        joined[0] = self.started  # ...but the stream's first
        self.started = True
        step = lengths + joined
        begin = np.cumsum(step) - lengths  # (D,) where each document's tokens start
        piece = np.empty(int(step.sum()), dtype=self.buf.dtype)
        is_sep = np.zeros(len(piece), dtype=bool)
        is_sep[begin[joined == 1] - 1] = True
        piece[is_sep] = self.sep
        piece[~is_sep] = ids
        self.buf = np.concatenate([self.buf, piece])
        self._cut()

    def _write_documents(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Each document from a new sequence: its token i goes to row i // body of its own
        rows, column 1 + i % body; [SEP] after its last token, [PAD] after that."""
        rows_per_doc = -(-lengths // self.body)  # (D,)
        n = int(rows_per_doc.sum())
        rows = np.full((n, self.writer.seq_len), self.pad, dtype=self.buf.dtype)  # (n, T)
        pos = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # (N,)
        row = np.repeat(np.cumsum(rows_per_doc) - rows_per_doc, lengths) + pos // self.body
        rows[row, 1 + pos % self.body] = ids
        rows[:, 0] = self.cls
        rows[np.arange(n), 1 + np.bincount(row, minlength=n)] = self.sep
        self.writer.write(rows)

    def _cut(self) -> None:
        buf, body, sep = self.buf, self.body, self.sep
        rows = np.empty((len(buf) // body, self.writer.seq_len), dtype=buf.dtype)  # (N, T)
        pos = n = 0
        while True:
            if pos < len(buf) and buf[pos] == sep:
                pos += 1  # never open a body with the joining [SEP]
            if len(buf) - pos < body:
                break
            rows[n, 1:-1] = buf[pos : pos + body]
            pos += body
            n += 1
        rows[:n, 0], rows[:n, -1] = self.cls, self.sep
        self.writer.write(rows[:n])
        self.buf = buf[pos:].copy()  # copy: do not pin the whole batch in memory

    def finish(self) -> dict[str, Any]:
        """Write the last, padded sequence; the split's manifest entry."""
        if len(self.buf):
            row = np.full((1, self.writer.seq_len), self.pad, dtype=self.buf.dtype)
            row[0, 0] = self.cls
            row[0, 1 : 1 + len(self.buf)] = self.buf
            row[0, 1 + len(self.buf)] = self.sep
            self.writer.write(row)
            self.buf = self.buf[:0]
        shards = self.writer.close()
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "sequences": sum(s["sequences"] for s in shards),
            "shards": shards,
        }


class _ShardWriter:
    """Appends sequences to split-00000.bin, split-00001.bin, ... of at most `limit` rows,
    hashing each shard's bytes as they are written (its SHARD_HASH goes in the manifest)."""

    def __init__(
        self, directory: Path, split: str, seq_len: int, dtype: np.dtype, limit: int
    ) -> None:
        self.directory, self.split, self.seq_len, self.dtype = directory, split, seq_len, dtype
        self.limit = limit
        self.shards: list[dict[str, Any]] = []
        self.file: BinaryIO | None = None
        self.hash = hashlib.new(SHARD_HASH)

    def write(self, rows: np.ndarray) -> None:  # rows: (N, seq_len)
        while len(rows):
            if self.file is None or self.shards[-1]["sequences"] == self.limit:
                self._next_shard()
            take = min(len(rows), self.limit - self.shards[-1]["sequences"])
            data = np.ascontiguousarray(rows[:take]).tobytes()
            self.file.write(data)  # type: ignore[union-attr]
            self.hash.update(data)
            self.shards[-1]["sequences"] += take
            rows = rows[take:]

    def _next_shard(self) -> None:
        self._close_shard()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file = os.fdopen(open_new(self.directory / name, exclusive=True), "wb")
        self.hash = hashlib.new(SHARD_HASH)
        self.shards.append({"file": name, "sequences": 0})

    def _close_shard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            self.shards[-1][SHARD_HASH] = self.hash.hexdigest()

    def close(self) -> list[dict[str, Any]]:
        self._close_shard()
        return self.shards

    def abandon(self) -> None:
        """Close the open shard after a failure. Its buffer may hold what a full disk
        refused: closing fails again, and must not do so later, from the collector."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


def _summary(manifest: dict[str, Any], stats: CorpusStats, elapsed: float, out: Path) -> None:
    train, valid = manifest["splits"]["train"], manifest["splits"]["valid"]
    mb = stats.bytes / 1e6
    print(
        f"prepare: {stats.documents:,} documents ({train['documents']:,} train, "
        f"{valid['documents']:,} valid), {train['tokens'] + valid['tokens']:,} tokens, "
        f"{train['sequences']:,} + {valid['sequences']:,} sequences of {manifest['seq_len']} "
        f"in {elapsed:.1f}s ({mb / max(elapsed, 1e-9):.1f} MB/s) -> {out}",
        file=sys.stderr,
    )
    for line in stats.summary_lines():  # files per format, every repair, unreadable files
        print(line, file=sys.stderr)
    for line in split_warnings(manifest, stats.documents):
        print(f"warning: {line}", file=sys.stderr)


# Fewer documents than this make a document-level held-out split coarse.
FEW_DOCUMENTS = 100
# A document of more tokens than this is most likely a file without blank lines.
HUGE_DOCUMENT_TOKENS = 1_000_000


def split_warnings(manifest: dict[str, Any], documents: int) -> list[str]:
    """What the held-out split cannot do well: documents are held out whole, so a corpus of
    few or huge documents (one sentence per line read as one document) holds out far more,
    or less, than valid_fraction of its sequences."""
    train, valid = manifest["splits"]["train"], manifest["splits"]["valid"]
    fraction = manifest.get("valid_fraction") or 0.0
    sequences = train["sequences"] + valid["sequences"]
    tokens = train["tokens"] + valid["tokens"]
    hint = (
        "if each line of your text is a document (one sentence per line), pass --one-doc-per-line"
    )
    out = []
    if fraction > 0 and 0 < documents < FEW_DOCUMENTS:
        out.append(
            f"only {documents:,} documents: the held-out split takes whole documents; {hint}"
        )
    elif documents and tokens / documents > HUGE_DOCUMENT_TOKENS:
        out.append(f"documents average {tokens // documents:,} tokens; {hint}")
    share = valid["sequences"] / sequences if sequences else 0.0
    if fraction > 0 and share > max(2 * fraction, fraction + 0.02):
        out.append(
            f"{share:.0%} of the sequences are held out ({valid['sequences']:,} of "
            f"{sequences:,}), not the {fraction:.0%} asked: whole documents are held out"
        )
    return out


def load_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a data directory made by `prepare`, checked."""
    path = Path(data_dir) / MANIFEST
    if not Path(data_dir).is_dir():
        raise BertforgeError(f"data directory not found: {data_dir}")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BertforgeError(
            f"not a bertforge data directory (no {MANIFEST}): {data_dir}"
        ) from None
    except ValueError as e:
        raise BertforgeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BertforgeError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise BertforgeError(
            f"{path}: manifest version {_shown(manifest.get('version'))} is "
            f"not supported (this bertforge reads version {VERSION})"
        )
    missing = [
        k
        for k in (
            "seq_len",
            "dtype",
            "vocab_size",
            "tokenizer_hash",
            "special_token_ids",
            "valid_fraction",
            "document_boundary",
            "splits",
        )
        if k not in manifest
    ]
    if missing:
        raise BertforgeError(f"{path}: manifest lacks {', '.join(missing)}")
    _check_fields(path, manifest)
    return manifest


def _shown(value: Any) -> str:
    """A manifest value as a message may quote it: short, one line."""
    return quote(json.dumps(value))


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_fields(path: Path, m: dict[str, Any]) -> None:
    """Refuse a manifest field of the wrong type or range, naming it: what reads the data
    trusts them (a seq_len of "32" would repeat a string instead of multiplying)."""

    def need(ok: bool, field: str, what: str, value: Any) -> None:
        if not ok:
            raise BertforgeError(
                f"{path}: manifest field {field} must be {what}, not {_shown(value)}"
            )

    need(
        _is_int(m["seq_len"], MIN_SEQ_LEN), "seq_len", f"an integer >= {MIN_SEQ_LEN}", m["seq_len"]
    )
    need(m["dtype"] in ("uint16", "uint32"), "dtype", "uint16 or uint32", m["dtype"])
    need(_is_int(m["vocab_size"], 1), "vocab_size", "an integer >= 1", m["vocab_size"])
    specials = m["special_token_ids"]
    need(isinstance(specials, dict), "special_token_ids", "an object", specials)
    for name in ("pad", "unk", "cls", "sep", "mask"):
        value = specials.get(name)
        need(
            _is_int(value) and value < m["vocab_size"],
            f"special_token_ids.{name}",
            "a token id below vocab_size",
            value,
        )
    value = m["tokenizer_hash"]
    need(
        isinstance(value, str) and re.fullmatch(r"[0-9a-f]{1,64}", value) is not None,
        "tokenizer_hash",
        "hex digits",
        value,
    )
    need(
        m["document_boundary"] in DOCUMENT_BOUNDARIES,
        "document_boundary",
        f"one of {', '.join(DOCUMENT_BOUNDARIES)}",
        m["document_boundary"],
    )
    value = m["valid_fraction"]
    need(
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
        "valid_fraction",
        "a number in [0, 1)",
        value,
    )
    need(isinstance(m["splits"], dict), "splits", "an object", m["splits"])
    for split, entry in m["splits"].items():
        where = f"splits.{quote(split)}"
        need(isinstance(entry, dict), where, "an object", entry)
        need(
            isinstance(entry.get("shards"), list), f"{where}.shards", "a list", entry.get("shards")
        )
        for i, shard in enumerate(entry["shards"]):
            need(isinstance(shard, dict), f"{where}.shards[{i}]", "an object", shard)
            name = shard.get("file")
            # A plain file name: a path would read (or hash) any file on the machine.
            need(
                isinstance(name, str) and re.fullmatch(r"\w[\w.-]*", name) is not None,
                f"{where}.shards[{i}].file",
                "a file name in the data directory",
                name,
            )
            # prepare writes no empty shard, and an empty file cannot be memory-mapped
            need(
                _is_int(shard.get("sequences"), 1),
                f"{where}.shards[{i}].sequences",
                "an integer >= 1",
                shard.get("sequences"),
            )
            digest = shard.get(SHARD_HASH)
            need(
                isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) is not None,
                f"{where}.shards[{i}].{SHARD_HASH}",
                "64 hex digits",
                digest,
            )


def open_split(data_dir: str | os.PathLike, split: str) -> list[np.memmap]:
    """Read-only memmaps, one per shard, each of shape (sequences, seq_len)."""
    manifest = load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise BertforgeError(
            f"{data_dir}: no split {split!r} (has {', '.join(manifest['splits'])})"
        )
    seq_len, dtype = manifest["seq_len"], np.dtype(manifest["dtype"])
    maps = []
    for shard in manifest["splits"][split]["shards"]:
        path = Path(data_dir) / shard["file"]
        n = shard["sequences"]
        expected = n * seq_len * dtype.itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            found = "missing" if size is None else f"{size} bytes, expected {expected}"
            raise BertforgeError(f"shard {path} is {found}; run prepare again")
        maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(n, seq_len)))
    return maps
