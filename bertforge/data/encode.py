"""Batch tokenization for `prepare`: exact, cached per chunk, on a pool of worker processes.

A text's tokens are its space-separated chunks' tokens, concatenated (`chunk_additive`),
so `BatchEncoder` looks most chunks up in a cache and sends only new ones to the Rust
tokenizer; `encode_batches` spreads batches over processes. The ids, and the output, are
the same whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

CACHE_CHUNKS = 1 << 19  # distinct chunks kept a process (about 120 MB when full)
_JOIN_CHARS = 1 << 16  # new chunks are encoded joined into strings of about this size
_HASH_BUCKETS = 10_000


class EncodedDocuments(NamedTuple):
    """One batch of documents, tokenized."""

    ids: np.ndarray  # (N,) the documents' tokens, one after another, in the shard dtype
    lengths: np.ndarray  # (D,) int64 tokens per document
    valid: np.ndarray  # (D,) bool: the document belongs to the validation split


def is_valid_document(doc: str, valid_fraction: float) -> bool:
    """Whether `doc` goes to the validation split: a hash of its text, so the choice does
    not depend on file order or batching, and exact duplicates land on the same side."""
    digest = hashlib.sha1(doc.encode("utf-8")).digest()
    return int.from_bytes(digest, "big") % _HASH_BUCKETS < valid_fraction * _HASH_BUCKETS


def available_cores() -> int:
    """The cores this process may run on: the default number of tokenizer processes."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def chunk_additive(tok: Tokenizer) -> bool:
    """Whether `tok`'s ids for a text are its space-separated chunks' ids, concatenated."""
    added = tok.get_added_tokens_decoder().values()
    return (
        isinstance(tok.normalizer, (normalizers.BertNormalizer, type(None)))
        and isinstance(tok.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
        and isinstance(tok.model, models.WordPiece)
        and all(t.special for t in added)
        and tok.encode_special_tokens
        and tok.truncation is None
        and tok.padding is None
    )


class _Chunks(dict):
    """chunk -> number, numbering chunks as they are first looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.new: list[str] = []

    def __missing__(self, chunk: str) -> int:
        number = self[chunk] = len(self)
        self.new.append(chunk)
        return number


class _Growable:
    """A 1-D array with amortised appends."""

    def __init__(self, dtype: np.dtype) -> None:
        self.data = np.empty(1024, dtype=dtype)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.size + len(values)
        if need > len(self.data):
            grown = np.empty(max(need, 2 * len(self.data)), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : need] = values
        self.size = need

    @property
    def array(self) -> np.ndarray:
        return self.data[: self.size]


class BatchEncoder:
    """Tokenizes batches of documents into flat id arrays (one process, single-threaded
    when the caller disables the tokenizer's parallelism).

    With BERT's pipeline (BertNormalizer, BertPreTokenizer, WordPiece) a space or a newline
    always ends a word, and normalisation maps characters one by one (NFD's reordering of
    combining marks stops at a space), so the tokens of a text are the tokens of its
    space/newline-separated chunks, concatenated. Most chunks of a corpus have been seen
    before (Zipf), so a chunk is looked up in a dict (a C-level `map` over the batch;
    Python code runs only for new chunks) and only new chunks go to the Rust tokenizer,
    all of a batch's joined in a few long strings and cut apart by their offsets.
    Tokenizers built otherwise (another normaliser, non-special added tokens, truncation)
    are encoded directly instead. The cache is emptied when it reaches `cache_chunks`
    entries, so its memory is bounded whatever the corpus size.
    """

    def __init__(
        self,
        tok: Tokenizer,
        dtype: np.dtype,
        valid_fraction: float,
        cache_chunks: int = CACHE_CHUNKS,
    ) -> None:
        self.tok, self.dtype, self.valid_fraction = tok, np.dtype(dtype), valid_fraction
        self.cached = chunk_additive(tok)
        self.cache_chunks = cache_chunks
        self._reset()

    def _reset(self) -> None:
        self.chunks = _Chunks()
        self.chunk_start = _Growable(np.dtype(np.int64))  # chunk number -> start in ids
        self.chunk_start.extend(np.zeros(1, dtype=np.int64))  # and its end at number + 1
        self.chunk_ids = _Growable(self.dtype)  # every cached chunk's ids, one after another

    def __call__(self, docs: list[str]) -> EncodedDocuments:
        valid = np.fromiter(
            (is_valid_document(d, self.valid_fraction) for d in docs), dtype=bool, count=len(docs)
        )
        if not self.cached:
            encodings = self.tok.encode_batch_fast(docs, add_special_tokens=False)
            lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, len(docs))
            ids = np.fromiter(
                itertools.chain.from_iterable(e.ids for e in encodings),
                dtype=self.dtype,
                count=int(lengths.sum()),
            )
            return EncodedDocuments(ids, lengths, valid)

        pieces = [d.replace("\n", " ").split(" ") for d in docs]
        per_doc = np.fromiter(map(len, pieces), np.int64, len(docs))  # chunks a document
        words = list(itertools.chain.from_iterable(pieces))
        if len(self.chunks) + len(words) > self.cache_chunks:
            self._reset()  # bounded memory; frequent chunks come back at once
        numbers = np.fromiter(map(self.chunks.__getitem__, words), np.int64, len(words))
        if self.chunks.new:
            self._encode_new(self.chunks.new)
            self.chunks.new = []
        starts = self.chunk_start.array
        first, count = starts[numbers], starts[numbers + 1] - starts[numbers]  # (W,)
        total = int(count.sum())
        # Gather the chunks' ids: output position p of chunk w reads first[w] + (p - out[w]).
        out_start = np.cumsum(count) - count
        index = np.repeat(first - out_start, count) + np.arange(total)
        ids = self.chunk_ids.array[index]
        chunk_end = np.cumsum(count)[np.cumsum(per_doc) - 1]  # (D,) a document's last chunk
        lengths = np.diff(chunk_end, prepend=0)
        return EncodedDocuments(ids, lengths, valid)

    def _encode_new(self, chunks: list[str]) -> None:
        """Encode `chunks` (numbered in order after the cached ones) and cache their ids.

        They are encoded joined by spaces, a few thousand to a string; a token belongs to
        the chunk its first character (its offset in the string) falls in.
        """
        step = max(1, _JOIN_CHARS // 8)
        groups = [chunks[i : i + step] for i in range(0, len(chunks), step)]
        encodings = self.tok.encode_batch([" ".join(g) for g in groups], add_special_tokens=False)
        for group, enc in zip(groups, encodings):
            size = np.fromiter(map(len, group), np.int64, len(group)) + 1  # and the space
            start = np.cumsum(size) - size  # (C,) each chunk's first character
            first_char = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]  # (N,)
            owner = np.searchsorted(start, first_char, side="right") - 1  # (N,) ascending
            count = np.bincount(owner, minlength=len(group))
            self.chunk_ids.extend(np.asarray(enc.ids, dtype=self.dtype))
            self.chunk_start.extend(self.chunk_start.array[-1] + np.cumsum(count))


@contextlib.contextmanager
def sequential_tokenizers() -> Iterator[None]:
    """The Rust tokenizer single-threaded meanwhile (it reads the variable at each call,
    and processes forked meanwhile inherit it)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


_worker: BatchEncoder | None = None  # this process's encoder, in a worker


def _init_worker(tokenizer_json: str, dtype: str, valid_fraction: float) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _worker is not None:  # forked: the parent's encoder, its cache already warm
        return
    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True
    _worker = BatchEncoder(tok, np.dtype(dtype), valid_fraction)


def _work(docs: list[str]) -> EncodedDocuments:
    assert _worker is not None
    return _worker(docs)


def encode_batches(
    batches: Iterator[list[str]],
    tok: Tokenizer,
    dtype: np.dtype,
    valid_fraction: float,
    workers: int,
) -> Iterator[EncodedDocuments]:
    """The batches, tokenized in order, by this process and `workers - 1` others.

    Processes, not the tokenizer's threads: the cache lookups are Python, which threads
    would serialise. Results come back in order, at most two batches a worker in flight,
    so memory does not grow with the corpus.

    This process encodes the first batch alone, then forks the others, which start with
    its cache (new chunks are most frequent at the start), and takes every `workers`-th
    batch itself while they encode theirs.
    """
    global _worker
    encoder = BatchEncoder(tok, dtype, valid_fraction)
    with sequential_tokenizers():
        first = next(batches, None)
        if first is None:
            return
        yield encoder(first)
        second = next(batches, None)
        if second is None:
            return
        rest = itertools.chain([second], batches)
        if workers <= 1:
            for batch in rest:
                yield encoder(batch)
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        _worker = encoder if method == "fork" else None
        try:
            with multiprocessing.get_context(method).Pool(
                workers - 1,
                initializer=_init_worker,
                initargs=(tok.to_str(), np.dtype(dtype).str, valid_fraction),
            ) as pool:
                pending: deque = deque()  # AsyncResults and own results, in batch order
                for k, batch in enumerate(rest):
                    if k % workers == workers - 1:
                        pending.append(encoder(batch))  # the others work meanwhile
                    else:
                        pending.append(pool.apply_async(_work, (batch,)))
                    while len(pending) > 2 * workers or (pending and _done(pending[0])):
                        yield _result(pending.popleft())
                while pending:
                    yield _result(pending.popleft())
        finally:
            _worker = None


def _done(item: Any) -> bool:
    return isinstance(item, EncodedDocuments) or item.ready()


def _result(item: Any) -> EncodedDocuments:
    return item if isinstance(item, EncodedDocuments) else item.get()
