"""Train and load BERT WordPiece tokenizers (the `tokenizers` library, Rust).

The tokenizer is built exactly like Google's BERT / transformers' BertTokenizer
(BertNormalizer, BertPreTokenizer, WordPiece with "##" continuations, the
``[CLS] A [SEP] (B [SEP])`` template). The five special tokens always take ids 0-4
([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4), so code and configs can rely on them. A
tokenizer directory holds tokenizer.json (what bertforge loads) and the files
`transformers.AutoTokenizer` reads, so it loads the same directory offline and encodes
identically. Training is not bit-for-bit reproducible (docs/data.md#the-tokenizer):
train once and reuse the directory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer
from tqdm import tqdm

from bertforge.data.corpus import (
    CorpusOptions,
    CorpusStats,
    batched,
    estimate_bytes,
    iter_documents,
    resolve_corpus,
)
from bertforge.data.readers import quote
from bertforge.errors import BertforgeError
from bertforge.fileio import make_dir, write_text_atomic
from bertforge.paths import mark, replace_owned, require_owned, sibling

# Order fixes the ids: the trainer assigns special tokens ids 0.. in list order.
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
MODEL_MAX_LENGTH = 512
# Characters kept in the initial alphabet (transformers' BertWordPieceTokenizer default):
# a Unicode-rich corpus would otherwise spend thousands of ids on one-off symbols.
LIMIT_ALPHABET = 1000
_BATCH_DOCUMENTS = 1000  # documents handed to the Rust trainer per Python call
# ... and at most about this many characters: the trainer reads ahead 256 batches, so
# this bounds the text held in memory (~50 MB) whatever the documents' sizes.
_BATCH_CHARS = 200_000


def build_tokenizer(lowercase: bool = True) -> Tokenizer:
    """An untrained BERT WordPiece pipeline (empty vocabulary)."""
    tok = Tokenizer(
        WordPiece(
            unk_token=SPECIAL_TOKENS["unk"],
            continuing_subword_prefix="##",
            max_input_chars_per_word=100,
        )
    )
    # strip_accents=None follows `lowercase`, as in the original BERT.
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _set_template(tok: Tokenizer) -> None:
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def train_tokenizer(
    corpus: list[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 30522,
    lowercase: bool = True,
    min_frequency: int = 2,
    show_progress: bool = True,
    options: CorpusOptions | None = None,
    sample_bytes: int | None = None,
    stats: CorpusStats | None = None,
) -> Path:
    """Train a WordPiece tokenizer on the documents of `corpus`; write it to `out_dir`.

    `corpus` holds files, directories, globs or hf: specs, read with `options`. The
    documents stream from disk into the trainer in batches, so memory grows with the
    number of distinct words, not with the corpus size. With `sample_bytes`, the trainer
    sees only about that many bytes of documents: the first documents of each file, in
    shares proportional to the files' sizes (`iter_documents`), so a large corpus needs no
    full pass and the same corpus always gives the same sample. `stats`, if given, is
    filled in. Returns `out_dir`.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise BertforgeError(f"vocab size {vocab_size} is too small (need > {len(SPECIAL_TOKENS)})")
    if min_frequency < 0:
        raise BertforgeError(f"min frequency {min_frequency} must be >= 0")
    if sample_bytes is not None and sample_bytes <= 0:
        raise BertforgeError(f"sample size {sample_bytes} must be > 0 bytes")
    files = resolve_corpus(corpus)
    stats = stats if stats is not None else CorpusStats()
    docs = iter_documents(files, stats, options, sample_bytes=sample_bytes)
    first = next(docs, None)
    if first is None:
        found = f" ({stats.problems()})" if stats.problems() else ""
        raise BertforgeError(f"corpus has no documents: {' '.join(map(str, corpus))}{found}")

    start = time.perf_counter()
    tok = build_tokenizer(lowercase)
    # Progress in bytes read, as prepare shows it (the trainer's own bar counts nothing
    # while it reads a generator).
    total = estimate_bytes(files)
    if sample_bytes is not None and total is not None:
        total = min(total, sample_bytes)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="tokenizer",  # a terminal's only
        disable=not (show_progress and sys.stderr.isatty()),
        file=sys.stderr,
    )
    trainer = WordPieceTrainer(
        # Progress is bertforge's own bar, in bytes read (the Rust one writes blank lines
        # off a terminal).
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS.values()),
        limit_alphabet=LIMIT_ALPHABET,
        continuing_subword_prefix="##",
    )
    batches = batched(itertools.chain([first], docs), _BATCH_CHARS, _BATCH_DOCUMENTS)
    tok.train_from_iterator(_read(batches, stats, bar), trainer=trainer)
    _set_template(tok)
    ids = special_token_ids(tok)
    if list(ids.values()) != list(range(len(SPECIAL_TOKENS))):
        raise AssertionError(f"special tokens got ids {ids}")  # a tokenizers change broke this

    out = save_tokenizer(tok, out_dir, lowercase)
    if show_progress:
        elapsed = time.perf_counter() - start
        sample = (
            f", a sample of about {sample_bytes / 1e6:,.1f} MB" if sample_bytes is not None else ""
        )
        print(
            f"tokenizer: vocab {tok.get_vocab_size()} from {stats.documents:,} documents "
            f"({stats.bytes / 1e6:.1f} MB read{sample}) in {elapsed:.1f}s "
            f"({stats.bytes / 1e6 / max(elapsed, 1e-9):.1f} MB/s) -> {out}",
            file=sys.stderr,
        )
        for line in stats.summary_lines():
            print(line, file=sys.stderr)
    return out


def _read(batches: Iterator[list[str]], stats: CorpusStats, bar: tqdm) -> Iterator[list[str]]:
    """`batches`, moving the progress bar by the bytes read; says when reading is done."""
    for batch in batches:
        bar.update(stats.bytes - bar.n)
        yield batch
    bar.update(stats.bytes - bar.n)
    shown = not bar.disable
    bar.close()
    if shown:
        print("tokenizer: choosing the vocabulary", file=sys.stderr, flush=True)


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike, lowercase: bool) -> Path:
    """Write the four tokenizer files into a new directory beside `out_dir`, swapped in
    whole (replacing only a tokenizer directory bertforge wrote)."""
    final = Path(out_dir)
    require_owned(final, "tokenizer")
    out = sibling(final)
    try:
        make_dir(final.parent)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
    except OSError as e:
        raise BertforgeError(
            f"cannot create tokenizer directory {final}: {e.strerror or e}"
        ) from None
    try:
        _write_tokenizer(tok, out, lowercase)
        replace_owned(out, final, "tokenizer")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return final


def _write_tokenizer(tok: Tokenizer, out: Path, lowercase: bool) -> None:
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    if [i for _, i in vocab] != list(range(len(vocab))):
        raise AssertionError("vocabulary ids are not contiguous")
    write_text_atomic(out / "vocab.txt", "".join(f"{t}\n" for t, _ in vocab))
    write_text_atomic(
        out / "tokenizer_config.json", json.dumps(_tokenizer_config(lowercase), indent=2) + "\n"
    )
    write_text_atomic(out / "special_tokens_map.json", json.dumps(_special_map(), indent=2) + "\n")
    write_text_atomic(out / TOKENIZER_FILE, tok.to_str(pretty=True))


def copy_tokenizer(
    src: str | os.PathLike, dst: str | os.PathLike, model_max_length: int | None = None
) -> Path:
    """Copy the tokenizer of directory `src` (bertforge's, or a Hugging Face model's), or of
    the directory of a tokenizer.json, into directory `dst`: its TOKENIZER_FILES, with
    tokenizer.json built from vocab.txt when `src` has only that (the same bytes every
    time, so data and runs made from one source share a tokenizer_hash) and
    tokenizer_config.json / special_tokens_map.json written when missing. Other files in
    `dst` (an HF model's config.json, weights) are left alone. A new `dst` appears whole
    or not at all; in an existing one each file is replaced atomically. With
    `model_max_length`, tokenizer_config.json says it (the model's
    max_position_embeddings), so that a transformers pipeline truncates to what the model
    can take."""
    src, dst = Path(src), Path(dst)
    src = src if src.is_dir() else src.parent
    tok = load_tokenizer(src)  # refuses what is not a BERT WordPiece tokenizer
    tmp = dst.with_name(f".{dst.name}.tokenizer.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if not (tmp / TOKENIZER_FILE).is_file():
            (tmp / TOKENIZER_FILE).write_text(tok.to_str(pretty=True), encoding="utf-8")
        if not (tmp / "tokenizer_config.json").is_file():
            (tmp / "tokenizer_config.json").write_text(
                json.dumps(_tokenizer_config(lowercases(tok)), indent=2) + "\n"
            )
        if not (tmp / "special_tokens_map.json").is_file():
            (tmp / "special_tokens_map.json").write_text(
                json.dumps(_special_map(), indent=2) + "\n"
            )
        settings = tmp / "tokenizer_config.json"
        if model_max_length is not None:
            config = json.loads(settings.read_text())
            config["model_max_length"] = model_max_length
            settings.write_text(json.dumps(config, indent=2) + "\n")
        if not dst.exists():
            mark(tmp, "tokenizer")
            os.replace(tmp, dst)
            return dst
        for path in tmp.iterdir():
            os.replace(path, dst / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _special_map() -> dict[str, str]:
    return {f"{name}_token": token for name, token in SPECIAL_TOKENS.items()}


def _tokenizer_config(lowercase: bool) -> dict[str, object]:
    """What transformers rebuilds a BertTokenizer from: it must say what our normalizer does."""
    return {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": lowercase,
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": True,
        **_special_map(),
    }


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> Tokenizer:
    """The WordPiece tokenizer in `tokenizer_dir`: its tokenizer.json (or that file itself),
    or a BERT vocab.txt with the lowercasing its tokenizer_config.json says. Truncation and
    padding a Hugging Face tokenizer.json may carry are turned off: bertforge decides."""
    path = Path(tokenizer_dir)
    if path.is_dir() and not (path / TOKENIZER_FILE).is_file() and (path / "vocab.txt").is_file():
        tok = tokenizer_from_vocab(path)
    else:
        path = _tokenizer_file(tokenizer_dir)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            first_line = (str(e).splitlines() or ["unreadable"])[0]
            raise BertforgeError(f"{path}: not a valid tokenizer file ({first_line})") from None
    special_token_ids(tok)  # fail early if it is not a BERT tokenizer
    tok.no_truncation()
    tok.no_padding()
    return tok


def load_truncating_tokenizer(tokenizer_dir: str | os.PathLike, max_length: int) -> Tokenizer:
    """`load_tokenizer`, set to truncate each text (or pair, longest first) to `max_length`
    tokens, and not to pad: what fine-tuning and prediction encode examples with."""
    tok = load_tokenizer(tokenizer_dir)
    tok.enable_truncation(max_length)
    return tok


def tokenizer_from_vocab(tokenizer_dir: Path) -> Tokenizer:
    """BERT's tokenizer built from a directory's vocab.txt, lowercasing (and stripping
    accents) as its tokenizer_config.json's do_lower_case says (default: lowercase)."""
    settings = tokenizer_dir / "tokenizer_config.json"
    try:
        config = json.loads(settings.read_text()) if settings.is_file() else {}
    except ValueError as e:
        raise BertforgeError(f"{settings}: not valid JSON ({e})") from None
    lowercase = config.get("do_lower_case", True) if isinstance(config, dict) else True
    tok = build_tokenizer(lowercase=bool(lowercase))
    check_vocab_file(tokenizer_dir / "vocab.txt")
    try:
        tok.model = WordPiece.from_file(
            str(tokenizer_dir / "vocab.txt"),
            unk_token=SPECIAL_TOKENS["unk"],
            max_input_chars_per_word=100,
        )
    except Exception as e:
        raise BertforgeError(
            f"{tokenizer_dir / 'vocab.txt'}: not a WordPiece vocabulary "
            f"({(str(e).splitlines() or ['unreadable'])[0]})"
        ) from None
    special_token_ids(tok)
    # As a trained tokenizer has them: "[MASK]" in a text is the mask token, not the
    # pieces "[", "mask", "]" (fill-mask found no mask in a vocab.txt-only directory).
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    _set_template(tok)
    return tok


def check_vocab_file(path: Path) -> None:
    """Refuse a vocab.txt with a token on two lines: a token's id is its line number, so
    the later line silently takes the token and leaves the earlier id unused (and the
    vocabulary smaller than its line count). The advice keeps the ids a model may have
    been trained with: the token keeps the later line's id, as tokenizers give it."""
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        for number, line in enumerate(f, 1):
            token = line.rstrip()  # as the WordPiece reader takes it
            if token in seen:
                raise BertforgeError(
                    f"{path}, line {number}: token {quote(token)} is also on line "
                    f"{seen[token]}; a token's id is its line number, so each must be on "
                    f"one line: replace line {seen[token]} by a placeholder no other line "
                    f"holds (e.g. [unused{seen[token]}]), which keeps every id as it is"
                )
            seen[token] = number


def lowercases(tok: Tokenizer) -> bool:
    """Whether `tok`'s normalizer lowercases (BertNormalizer's flag, or a Lowercase step)."""
    normalizer = json.loads(tok.to_str()).get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer])
    return any(n.get("type") == "Lowercase" or n.get("lowercase") for n in steps)


def tokenizer_hash(tokenizer_dir: str | os.PathLike) -> str:
    """A short fingerprint of tokenizer.json, to tell data made by different tokenizers apart."""
    return hashlib.sha256(_tokenizer_file(tokenizer_dir).read_bytes()).hexdigest()[:16]


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """{"pad", "unk", "cls", "sep", "mask"} -> id."""
    ids = {name: tok.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[name] for name, i in ids.items() if i is None]
    if missing:
        raise BertforgeError(f"tokenizer lacks special tokens {', '.join(missing)}")
    return ids  # type: ignore[return-value]


def _tokenizer_file(tokenizer_dir: str | os.PathLike) -> Path:
    path = Path(tokenizer_dir)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        where = "tokenizer directory" if not Path(tokenizer_dir).exists() else "tokenizer file"
        raise BertforgeError(f"{where} not found: {path}")
    return path
