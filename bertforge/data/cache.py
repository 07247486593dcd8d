"""The cache of `pretrain --corpus`: the tokenizer and token shards a run builds in RUN_DIR.

`build_data` trains (or copies) the tokenizer and prepares the shards only where they are
not already there from the same input. RUN_DIR/built_from.json records that input (each
corpus file with its size and mtime, and the options that shape the result) and is checked
against the cached files it describes. Where the input changed, what it shaped is rebuilt
while the run has no checkpoint yet, and refused, naming the change, once it has one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bertforge import paths, rundir
from bertforge.config import DataConfig
from bertforge.data.corpus import CorpusOptions, resolve_corpus
from bertforge.data.prepare import prepare
from bertforge.data.readers import quote
from bertforge.data.tokenizer import copy_tokenizer, load_tokenizer, tokenizer_hash, train_tokenizer
from bertforge.errors import BertforgeError
from bertforge.fileio import write_text_atomic
from bertforge.paths import replace_owned, require_owned

# What RUN_DIR's cached tokenizer and data were built from, and which of those inputs the
# tokenizer depends on (the data depends on all of them).
BUILT_FROM = "built_from.json"
_TOKENIZER_INPUTS = (
    "corpus",
    "corpus_options",
    "tokenizer",
    "vocab_size",
    "lowercase",
    "sample_bytes",
)


def build_data(
    run_dir: Path,
    corpus: list[str],
    data: DataConfig,
    *,
    has_checkpoint: bool,
    vocab_size: int,
    lowercase: bool = True,
    tokenizer: Path | None = None,
    corpus_options: CorpusOptions | None = None,
    sample_bytes: int | None = None,
    show_progress: bool = True,
) -> Path:
    """RUN_DIR/tokenizer and RUN_DIR/data, each built only if not already there from the
    same input; returns the data directory.

    Both read the corpus with `corpus_options`. The tokenizer is a copy of `tokenizer` (a
    tokenizer or model directory), or else trained on about `sample_bytes` of the corpus
    with `vocab_size` and `lowercase`. The shards are prepared as `data` says (seq_len,
    valid_fraction, document_boundary). `has_checkpoint`: the run has trained on what is
    cached, so a change of input is refused rather than rebuilt.
    """
    files = [str(p) for p in resolve_corpus(corpus)]
    tok_dir, data_dir = run_dir / rundir.TOKENIZER, run_dir / rundir.DATA
    record = _build_record(files, corpus_options, data)
    if tokenizer is not None:
        record["tokenizer"] = _copy_hash(tokenizer)
    else:
        record.update(vocab_size=vocab_size, lowercase=lowercase, sample_bytes=sample_bytes)
    changed, known = _changes(run_dir / BUILT_FROM, record, tok_dir)
    # The record is checked against what it describes: an edited one must not pass off
    # another corpus's cached tokenizer and shards as this corpus's.
    mismatch = None if changed else _cache_mismatch(tok_dir, data_dir, files)
    if mismatch:
        changed = ["cache"]
    if not tok_dir.exists():
        stale_tok = False
    elif tokenizer is not None:  # a copy: of this tokenizer, and whole?
        stale_tok = (
            not (tok_dir / "tokenizer.json").is_file()
            or tokenizer_hash(tok_dir) != record["tokenizer"]
        )
    else:
        stale_tok = any(k in (*_TOKENIZER_INPUTS, "cache") for k in changed)
    stale_data = data_dir.exists() and bool(changed or stale_tok)
    if (stale_tok or stale_data) and has_checkpoint:
        if mismatch:
            what = mismatch
        elif known is None:
            what = f"it has no readable {BUILT_FROM}"
        else:
            what = _describe(changed[0] if changed else "tokenizer", known, record)
        raise BertforgeError(
            f"{run_dir} was built from other input ({what}) and its "
            f"checkpoints were trained on it; give the run's own corpus and "
            f"options, or another --out"
        )
    for stale, path, kind in ((stale_tok, tok_dir, "tokenizer"), (stale_data, data_dir, "data")):
        if stale:  # only what bertforge wrote there: a folder of the user's is refused
            require_owned(path, kind)
            print(f"pretrain: {path} was built from other input, rebuilding it", file=sys.stderr)
    # Each rebuilt directory replaces the stale one whole (a kill leaves one or the
    # other), and the record goes last: a kill before it means "rebuild" next time.
    # tokenizer and prepare print their own summaries: nothing is printed twice.
    if stale_tok or not (tok_dir / "tokenizer.json").is_file():
        if tokenizer is not None:
            fresh = paths.sibling(tok_dir)
            try:
                copy_tokenizer(tokenizer, fresh)
                replace_owned(fresh, tok_dir, "tokenizer")
            finally:
                shutil.rmtree(fresh, ignore_errors=True)
        else:
            train_tokenizer(
                files,
                tok_dir,
                vocab_size=vocab_size,
                lowercase=lowercase,
                show_progress=show_progress,
                options=corpus_options,
                sample_bytes=sample_bytes,
            )
    if stale_data or not (data_dir / "manifest.json").is_file():
        prepare(
            files,
            tok_dir,
            data_dir,
            seq_len=data.seq_len,
            valid_fraction=data.valid_fraction,
            show_progress=show_progress,
            corpus_options=corpus_options,
            document_boundary=data.document_boundary,
        )
    write_text_atomic(run_dir / BUILT_FROM, json.dumps(record, indent=1) + "\n")
    return data_dir


def _build_record(
    files: list[str], corpus_options: CorpusOptions | None, data: DataConfig
) -> dict[str, Any]:
    """The input of `build_data` but the tokenizer's: each corpus file's absolute path,
    size and mtime (an hf: dataset by its name), the corpus-reading options, and the
    data options."""
    corpus: list[list[Any]] = []
    for f in files:
        if f.startswith("hf:"):
            corpus.append([f, None, None])
        else:
            st = os.stat(f)
            corpus.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    options = dataclasses.asdict(corpus_options or CorpusOptions())
    return {
        "corpus": corpus,
        "corpus_options": options,
        "tokenizer": None,
        "vocab_size": None,
        "lowercase": None,
        "sample_bytes": None,
        "seq_len": data.seq_len,
        "valid_fraction": data.valid_fraction,
        "document_boundary": data.document_boundary,
    }


def _changes(
    path: Path, record: dict[str, Any], tok_dir: Path
) -> tuple[list[str], dict[str, Any] | None]:
    """(the inputs in `record` that differ from those recorded at `path`, the recorded
    ones); with nothing recorded, everything differs."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = None
    if not (
        isinstance(known, dict)
        and isinstance(known.get("corpus_options"), dict)
        and isinstance(known.get("corpus"), list)
        and all(
            isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) for f in known["corpus"]
        )
    ):
        return list(record), None
    changed = [k for k, v in record.items() if known.get(k) != v]
    # A resume passes the run's vocab_size, the trained tokenizer's: it can be smaller
    # than the size asked for, on a corpus with fewer word pieces.
    if (
        "vocab_size" in changed
        and (tok_dir / "tokenizer.json").is_file()
        and load_tokenizer(tok_dir).get_vocab_size(with_added_tokens=True) == record["vocab_size"]
    ):
        changed.remove("vocab_size")
    return changed, known


def _cache_mismatch(tok_dir: Path, data_dir: Path, files: list[str]) -> str | None:
    """What in RUN_DIR's cached data contradicts BUILT_FROM's record of it (the corpus
    files its manifest names, the tokenizer it was made with); None when it agrees or
    there is no data yet."""
    try:
        manifest = json.loads((data_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None  # no complete data: it is (re)built
    made_from = manifest.get("corpus_files") if isinstance(manifest, dict) else None
    if (
        not isinstance(made_from, list)
        or len(made_from) != len(files)
        or not all(isinstance(m, str) and _same_file(m, f) for m, f in zip(made_from, files))
    ):
        return f"{data_dir / 'manifest.json'} names other corpus files than {BUILT_FROM} records"
    if (tok_dir / "tokenizer.json").is_file() and manifest.get("tokenizer_hash") != tokenizer_hash(
        tok_dir
    ):
        return f"{data_dir} was made with another tokenizer than {tok_dir}'s"
    return None


def _same_file(recorded: str, given: str) -> bool:
    """Whether a manifest's corpus path (absolute, or relative to where prepare ran) names
    corpus file `given`."""
    if recorded.startswith("hf:") or given.startswith("hf:"):
        return recorded == given
    if os.path.isabs(recorded):
        return os.path.abspath(recorded) == os.path.abspath(given)
    return (
        Path(os.path.abspath(given)).parts[-len(Path(recorded).parts) :]
        == Path(os.path.normpath(recorded)).parts
    )


def _describe(key: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    """One input that changed, for a message: which corpus file, which option."""
    if key == "corpus":
        was = {f[0]: f[1:] for f in old.get("corpus") or []}
        now = {f[0]: f[1:] for f in new["corpus"]}
        for name in now:
            if name not in was:
                return f"the corpus has a new file {quote(str(name))}"
            if was[name] != now[name]:
                return f"corpus file {quote(str(name))} changed (size or modification time)"
        gone = [name for name in was if name not in now]
        return (
            f"corpus file {quote(str(gone[0]))} is no longer in it"
            if gone
            else "the corpus files are in another order"
        )
    if key == "corpus_options":
        was, now = old[key], new[key]
        name = next((k for k in now if was.get(k) != now[k]), None)
        if name is None:
            return "the corpus options"
        return f"corpus option {name} was {quote(repr(was.get(name)))}, now {now[name]!r}"
    if key == "tokenizer":
        return "another tokenizer (--tokenizer, --init)"
    return f"{key} was {quote(repr(old.get(key)))}, now {new[key]!r}"


def _copy_hash(source: Path) -> str:
    """The tokenizer_hash a copy of tokenizer `source` has (a directory with only vocab.txt
    gets a tokenizer.json built, always the same)."""
    with tempfile.TemporaryDirectory() as tmp:  # not in RUN_DIR: a kill leaves nothing there
        return tokenizer_hash(copy_tokenizer(source, Path(tmp) / "tokenizer"))
