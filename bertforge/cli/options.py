"""What the `bertforge` commands share to build their parsers: the parser class, the
duration and size types, the corpus flags, and the flags generated from a config
dataclass's fields (their help text is the field's). Imported by cli.main and
cli.downstream alike, so that neither needs the other's helpers.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any

from bertforge.config import number


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2 (argparse adds usage)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '1h30m', '1.5h' -> seconds."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", text)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != text.replace(" ", ""):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (e.g. 90s, 30m, 1h30m)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def parse_size(text: str) -> int:
    """'2000000', '500M', '2G', '1.5GB', '64KiB' -> bytes (K/M/G/T are powers of 1000,
    KiB/MiB/GiB/TiB of 1024)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?)b?|b?)", str(text).strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 500M, 2G, 64KiB)")
    value, unit, binary = m.groups()
    scale = (1024 if binary else 1000) ** ("kmgt".index(unit) + 1) if unit else 1
    size = int(float(value) * scale)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be > 0")
    return size


CORPUS_FLAGS = ("text_field", "text_column", "one_doc_per_line", "dedup")


def add_corpus_options(parser: argparse.ArgumentParser, sample: bool) -> None:
    """The corpus-reading flags, the same on every command that reads a corpus."""
    g = parser.add_argument_group("corpus options")
    g.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="JSONL: the field that holds the text (default: text)",
    )
    g.add_argument(
        "--text-column",
        default="text",
        metavar="NAME",
        help="CSV, TSV, Parquet and hf: datasets: the column that holds the text (default: text)",
    )
    g.add_argument(
        "--one-doc-per-line",
        action="store_true",
        help="plain text: each non-empty line is a document (default: documents "
        "are separated by blank lines)",
    )
    g.add_argument(
        "--dedup",
        action="store_true",
        help="drop exact duplicate documents (memory: ~100 bytes per document)",
    )
    if sample:
        g.add_argument(
            "--sample-bytes",
            type=parse_size,
            default=None,
            metavar="SIZE",
            help="train the tokenizer on about this much text (e.g. 500M, 2G): the "
            "first documents of each file, shares by file size (default: all)",
        )


def corpus_options(args: argparse.Namespace) -> dict[str, Any]:
    """The corpus flags' values, as keywords of the Python API."""
    return {name: getattr(args, name) for name in CORPUS_FLAGS}


def add_fields(
    parser: argparse.ArgumentParser,
    kind: type,
    names: list[str],
    section: str,
    defaults: dict[str, Any] | None = None,
    helps: dict[str, str] | None = None,
) -> None:
    """A flag for each field `names` of dataclass `kind`, typed by its annotation, with its
    help text (or `helps`'), its default shown (or `defaults`'); values land in
    args.SECTION.FIELD only when typed (`typed_fields` collects them)."""
    hints = typing.get_type_hints(kind)
    by_name = {f.name: f for f in dataclasses.fields(kind)}
    group = parser.add_argument_group(f"{section} options")
    for name in names:
        f = by_name[name]
        flag, text = f"--{name.replace('_', '-')}", (helps or {}).get(name, f.metadata["help"])
        base = next(
            a for a in (typing.get_args(hints[name]) or (hints[name],)) if a is not type(None)
        )
        if base is bool:  # a switch: --compile (and --no-compile where None means "auto")
            group.add_argument(
                flag,
                dest=f"{section}.{name}",
                action="store_const",
                const=True,
                default=argparse.SUPPRESS,
                help=text if f.default is None else f"{text} (default: off)",
            )
            if f.default is None:
                group.add_argument(
                    f"--no-{name.replace('_', '-')}",
                    dest=f"{section}.{name}",
                    action="store_const",
                    const=False,
                    default=argparse.SUPPRESS,
                    help=argparse.SUPPRESS,
                )
            continue
        default = (defaults or {}).get(name, "from --preset" if section == "model" else f.default)
        parse: Any = base
        if base in (int, float):  # refused in one line at parse time, by the field's rule
            parse = number(
                base, f.metadata["rule"], parse_duration if name == "time_budget" else None
            )
        group.add_argument(
            flag,
            dest=f"{section}.{name}",
            type=parse,
            default=argparse.SUPPRESS,
            metavar=f.metadata.get("metavar") or base.__name__.upper(),
            help=text if default is None else f"{text} (default: {default})",
        )


def typed_fields(args: argparse.Namespace, *sections: str) -> dict[str, Any]:
    """The config fields of `sections` the user typed as flags, by field name."""
    return {
        key.split(".", 1)[1]: value
        for key, value in vars(args).items()
        if "." in key and key.split(".", 1)[0] in sections
    }
