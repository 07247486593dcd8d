"""Labelled examples for fine-tuning: reading CSV, TSV and JSONL files, and label spaces.

Every problem in a file (a missing column, a row with the wrong number of fields, an
unknown label, no examples at all) raises BertforgeError naming the file and the line,
before any model is loaded. TSV files are read without quoting, as GLUE's are (their
sentences hold stray quote characters); CSV files use standard CSV quoting.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bertforge.data.readers import quote
from bertforge.errors import BertforgeError

# The field-count check below must not trip over long CSV fields.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class Examples:
    """One split: texts (and second texts for pair tasks) with their targets."""

    path: Path
    texts: list[str]
    pairs: list[str] | None
    y: np.ndarray  # (N,) int64 class ids, or float32 targets for regression
    lines: list[int] = field(default_factory=list)  # the file line of each example

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int) -> Examples:
        """The first n examples (all when n is 0)."""
        if not n or n >= len(self):
            return self
        return Examples(
            self.path,
            self.texts[:n],
            self.pairs[:n] if self.pairs else None,
            self.y[:n],
            self.lines[:n],
        )


@dataclass
class TaskData:
    """A fine-tuning task: its splits, label names and the metrics it is judged by."""

    name: str
    train: Examples
    validation: dict[str, Examples]  # {"": dev} or e.g. {"matched": ..., "mismatched": ...}
    labels: list[str] | None  # class names in id order; None for regression
    metrics: tuple[str, ...]  # computed on every validation split (bertforge.tasks.scores names)
    score: tuple[str, ...]  # averaged (over them and over the splits) into the headline score

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


def data_hashes(data: TaskData) -> dict[str, str]:
    """sha256 of each split's content (texts, second texts, targets), by split ("train",
    "validation", "validation matched", ...): what a fine-tuning run records, so that a
    resume on other data (a file of the same name, another task's) is refused."""
    splits = {
        "train": data.train,
        **{" ".join(("validation", k)).strip(): v for k, v in data.validation.items()},
    }
    out = {}
    for name, ex in splits.items():
        h = hashlib.sha256(json.dumps([data.labels, ex.texts, ex.pairs]).encode())
        h.update(np.ascontiguousarray(ex.y).tobytes())
        out[name] = h.hexdigest()
    return out


def rows_tsv(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line, split on tabs, no quoting."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line.split("\t")
    except FileNotFoundError:
        raise BertforgeError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise BertforgeError(f"{path} is a directory, not a file") from None


def _rows_csv(path: Path) -> Iterator[tuple[int, list[str]]]:
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            reader = csv.reader(f)
            try:
                for row in reader:
                    if any(cell.strip() for cell in row):
                        yield reader.line_num, row
            except csv.Error as e:
                raise BertforgeError(f"{path}, line {reader.line_num}: bad CSV ({e})") from None
    except FileNotFoundError:
        raise BertforgeError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise BertforgeError(f"{path} is a directory, not a file") from None


def read_records(path: Path, columns: list[str]) -> Iterator[tuple[int, list[Any]]]:
    """(line number, [value of each column]) of each example in a CSV, TSV or JSONL file.

    CSV and TSV files need a header row naming the columns; every row must have as many
    fields as the header. A JSONL line is an object holding every column.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from _read_jsonl(path, columns)
        return
    if suffix not in (".csv", ".tsv"):
        raise BertforgeError(f"{path}: unknown format {suffix!r} (use .csv, .tsv or .jsonl)")
    rows = rows_tsv(path) if suffix == ".tsv" else _rows_csv(path)
    first = next(rows, None)
    if first is None:
        raise BertforgeError(f"{path}: empty file (no header, no examples)")
    header = [h.strip() for h in first[1]]
    missing = [c for c in columns if c not in header]
    if missing:
        raise BertforgeError(
            f"{path}, line {first[0]}: no column {missing[0]!r} in the header "
            f"(columns: {quote(', '.join(header))})"
        )
    index = [header.index(c) for c in columns]
    for number, row in rows:
        if len(row) != len(header):
            raise BertforgeError(
                f"{path}, line {number}: {len(row)} fields, but the header has {len(header)}"
            )
        yield number, [row[i] for i in index]


def _read_jsonl(path: Path, columns: list[str]) -> Iterator[tuple[int, list[Any]]]:
    try:
        f = open(path, encoding="utf-8-sig", errors="replace")
    except FileNotFoundError:
        raise BertforgeError(f"file not found: {path}") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise BertforgeError(f"{path}, line {number}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise BertforgeError(f"{path}, line {number}: expected a JSON object")
            missing = [c for c in columns if c not in record]
            if missing:
                raise BertforgeError(
                    f"{path}, line {number}: no field {missing[0]!r} "
                    f"(fields: {quote(', '.join(record))})"
                )
            yield number, [record[c] for c in columns]


def _text(value: Any, path: Path, number: int, column: str) -> str:
    if not isinstance(value, str):
        raise BertforgeError(
            f"{path}, line {number}: {column!r} is {quote(repr(value))}, not a text"
        )
    return value.strip()


def _label_text(value: Any, path: Path, number: int) -> str:
    """A class label as a string: JSON numbers 0 and 0.0 both become '0'."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise BertforgeError(
            f"{path}, line {number}: label {quote(repr(value))} is not a class name"
        )
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    if not text:
        raise BertforgeError(f"{path}, line {number}: empty label")
    return text


def _refuse_fractions(labels: list[str], lines: list[int], path: Path) -> None:
    """Class labels that are fractional numbers are targets of a regression task: read as
    class names they would make a class of every value seen."""
    for value, number in zip(labels, lines):
        try:
            fractional = not float(value).is_integer()
        except ValueError:
            continue
        if fractional:
            raise BertforgeError(
                f"{path}, line {number}: label {quote(value)} is a "
                f"fractional number, not a class name; pass --regression "
                f"for numeric targets"
            )


def _sort_labels(names: set[str]) -> list[str]:
    """Numeric labels in numeric order ('2' before '10'), others alphabetically."""
    try:
        return sorted(names, key=lambda s: (float(s), s))
    except ValueError:
        return sorted(names)


def encode_labels(
    raw: list[str], lines: list[int], classes: list[str] | None, path: Path
) -> np.ndarray:
    """Class ids (int64) for classification, float32 targets for regression (classes None)."""
    if classes is None:
        out = np.empty(len(raw), dtype=np.float32)
        for i, (value, number) in enumerate(zip(raw, lines)):
            try:
                out[i] = float(value)
            except (TypeError, ValueError):
                raise BertforgeError(
                    f"{path}, line {number}: label {quote(repr(value))} is "
                    f"not a number (a regression task)"
                ) from None
            if not np.isfinite(out[i]):
                raise BertforgeError(
                    f"{path}, line {number}: label {quote(repr(value))} is not finite"
                )
        return out
    ids = {name: i for i, name in enumerate(classes)}
    out = np.empty(len(raw), dtype=np.int64)
    for i, (value, number) in enumerate(zip(raw, lines)):
        if value not in ids:
            raise BertforgeError(
                f"{path}, line {number}: unknown label {quote(repr(value))} "
                f"(expected one of {len(classes)}: "
                f"{quote(', '.join(classes))})"
            )
        out[i] = ids[value]
    return out


def _read_split(
    path: Path, text: str, pair: str | None, label: str, regression: bool
) -> tuple[list[str], list[str] | None, list[Any], list[int]]:
    columns = [text, label] + ([pair] if pair else [])
    texts: list[str] = []
    pairs: list[str] | None = [] if pair else None
    labels: list[Any] = []
    lines: list[int] = []
    for number, values in read_records(path, columns):
        texts.append(_text(values[0], path, number, text))
        if pair and pairs is not None:
            pairs.append(_text(values[2], path, number, pair))
        labels.append(values[1] if regression else _label_text(values[1], path, number))
        lines.append(number)
    if not texts:
        raise BertforgeError(f"{path}: no examples (only a header)")
    return texts, pairs, labels, lines


def load_own_task(
    train: Path,
    validation: Path,
    text_column: str,
    label_column: str,
    pair_column: str | None = None,
    regression: bool = False,
) -> TaskData:
    """A task from the user's own files; class names are the training set's labels."""
    train, validation = Path(train), Path(validation)
    parts = {
        p: _read_split(p, text_column, pair_column, label_column, regression)
        for p in (train, validation)
    }
    if not regression:
        for path, (_, _, labels, lines) in parts.items():
            _refuse_fractions(labels, lines, path)
    classes = None if regression else _sort_labels(set(parts[train][2]))
    if classes is not None and len(classes) < 2:
        raise BertforgeError(
            f"{train}: every example has the label {classes[0]!r}; a "
            f"classifier needs at least two classes (or pass --regression)"
        )
    splits = {
        p: Examples(p, texts, pairs, encode_labels(labels, lines, classes, p), lines)
        for p, (texts, pairs, labels, lines) in parts.items()
    }
    metrics: tuple[str, ...]
    score: tuple[str, ...]
    if classes is None:  # regression
        metrics, score = ("pearson", "spearman", "mse"), ("pearson", "spearman")
    elif len(classes) == 2:
        metrics, score = ("accuracy", "f1", "matthews"), ("accuracy",)
    else:
        metrics, score = ("accuracy", "matthews"), ("accuracy",)
    return TaskData(
        name=train.stem,
        train=splits[train],
        validation={"": splits[validation]},
        labels=classes,
        metrics=metrics,
        score=score,
    )


def iter_inputs(
    path: Path, text_column: str, pair_column: str | None = None
) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, second text or None) of each input to predict on, in order,
    read as it streams (bounded memory). A .txt file or stdin ('-') gives one a line,
    blank lines too (their text empty): lines end at '\n' only (a lone CR stays inside its
    line), and bytes that are not UTF-8 are replaced, as everywhere. CSV, TSV and JSONL
    files give one a row (`read_records`)."""
    path = Path(path)
    if path.suffix.lower() != ".txt" and str(path) != "-":
        for number, values in read_records(
            path, [text_column] + ([pair_column] if pair_column else [])
        ):
            yield (
                number,
                _text(values[0], path, number, text_column),
                _text(values[1], path, number, pair_column) if pair_column else None,
            )
        return
    if pair_column:
        raise BertforgeError(
            f"{path}: a .txt input has one text a line; use CSV, TSV or JSONL for text pairs"
        )
    try:
        stream = sys.stdin.buffer if str(path) == "-" else open(path, "rb")
    except FileNotFoundError:
        raise BertforgeError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise BertforgeError(f"{path} is a directory, not a file") from None
    with stream if stream is not sys.stdin.buffer else contextlib.nullcontext(stream):
        for number, raw in enumerate(stream, 1):  # binary lines end at b"\n" only
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            text = raw.decode("utf-8", errors="replace").removesuffix("\n").removesuffix("\r")
            yield number, text.strip(), None
