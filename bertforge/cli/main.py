"""The `bertforge` command.

Flags for config values are generated from the config dataclasses (their help text is
the field's), so the CLI, config.yaml and the Python API cannot drift apart. Values are
layered: defaults < --preset < --config FILE.yaml < flags. Bad input of any kind ends in
one line on stderr and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bertforge.config import (DEFAULT_WARMUP_FRACTION, PRESETS, DataConfig, ModelConfig, RunConfig,
                              TrainConfig, build, field_number, merge, number, preset, read_yaml,
                              typed_sections)
from bertforge.errors import BertforgeError, Interrupted, Terminated
from bertforge.fileio import require_utf8, write_text_atomic
from bertforge.paths import Output, check_paths

# Config fields exposed as flags (the rest are reachable through --config FILE.yaml).
MODEL_FLAGS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings"]
DATA_FLAGS = ["seq_len", "valid_fraction", "mask_rate", "mask_token_ratio", "random_token_ratio",
              "masking", "span_p", "span_max", "objective", "document_boundary"]
TRAIN_FLAGS = [f.name for f in dataclasses.fields(TrainConfig)]
# The ModelConfig fields a preset sets.
PRESET_FIELDS = ["num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"]


EXAMPLE = """example:
  bertforge pretrain --corpus data/enwiki-2015-sample.txt.xz --out runs/mini --max-steps 3000
  bertforge evaluate runs/mini
  bertforge fill-mask runs/mini/hf "The capital of France is [MASK]."

`bertforge COMMAND --help` lists every flag of a command."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
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
    number, unit, binary = m.groups()
    scale = (1024 if binary else 1000) ** ("kmgt".index(unit) + 1) if unit else 1
    size = int(float(number) * scale)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be > 0")
    return size


def _add_corpus_options(parser: argparse.ArgumentParser, sample: bool) -> None:
    """The corpus-reading flags, the same on every command that reads a corpus."""
    g = parser.add_argument_group("corpus options")
    g.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSONL: the field that holds the text (default: text)")
    g.add_argument("--text-column", default="text", metavar="NAME",
                   help="CSV, TSV, Parquet and hf: datasets: the column that holds the text "
                   "(default: text)")
    g.add_argument("--one-doc-per-line", action="store_true",
                   help="plain text: each non-empty line is a document (default: documents "
                   "are separated by blank lines)")
    g.add_argument("--dedup", action="store_true",
                   help="drop exact duplicate documents (memory: ~100 bytes per document)")
    if sample:
        g.add_argument("--sample-bytes", type=parse_size, default=None, metavar="SIZE",
                       help="train the tokenizer on about this much text (e.g. 500M, 2G): the "
                       "first documents of each file, shares by file size (default: all)")


def _corpus_options(args: argparse.Namespace) -> Any:
    from bertforge.data.corpus import CorpusOptions

    return CorpusOptions(text_field=args.text_field, text_column=args.text_column,
                         one_doc_per_line=args.one_doc_per_line, dedup=args.dedup)


def _add_fields(parser: argparse.ArgumentParser, kind: type, names: list[str],
                section: str, defaults: dict[str, Any] | None = None,
                helps: dict[str, str] | None = None) -> None:
    """A flag for each field `names` of dataclass `kind`, typed by its annotation, with its
    help text (or `helps`'), its default shown (or `defaults`'); values land in
    args.SECTION.FIELD only when typed."""
    hints = typing.get_type_hints(kind)
    by_name = {f.name: f for f in dataclasses.fields(kind)}
    group = parser.add_argument_group(f"{section} options")
    for name in names:
        f = by_name[name]
        flag, text = f"--{name.replace('_', '-')}", (helps or {}).get(name, f.metadata["help"])
        base = next(a for a in (typing.get_args(hints[name]) or (hints[name],))
                    if a is not type(None))
        if base is bool:  # a switch: --compile (and --no-compile where None means "auto")
            group.add_argument(flag, dest=f"{section}.{name}", action="store_const", const=True,
                               default=argparse.SUPPRESS,
                               help=text if f.default is None else f"{text} (default: off)")
            if f.default is None:
                group.add_argument(f"--no-{name.replace('_', '-')}", dest=f"{section}.{name}",
                                   action="store_const", const=False, default=argparse.SUPPRESS,
                                   help=argparse.SUPPRESS)
            continue
        default = (defaults or {}).get(name, "from --preset" if section == "model" else f.default)
        kind: Any = base
        if base in (int, float):  # refused in one line at parse time, by the field's rule
            kind = number(base, f.metadata["rule"],
                          parse_duration if name == "time_budget" else None)
        group.add_argument(flag, dest=f"{section}.{name}", type=kind,
                           default=argparse.SUPPRESS,
                           metavar=f.metadata.get("metavar") or base.__name__.upper(),
                           help=text if default is None else f"{text} (default: {default})")


def add_legacy_warmup(parser: argparse.ArgumentParser) -> None:
    """--warmup, the spelling of earlier versions: steps when >= 1, else a fraction."""
    parser.add_argument("--warmup", dest="train.warmup", type=number(float, ">= 0"),
                        default=argparse.SUPPRESS, metavar="FLOAT",
                        help="linear warmup, as earlier versions spelled it: a number of "
                        "steps if >= 1, else a fraction of the run (prefer --warmup-steps "
                        "or --warmup-fraction)")


def _given(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config values the user typed, by section."""
    out: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "train": {}}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            merge(out[section], {name: value})
    if getattr(args, "dropout", None) is not None:
        out["model"]["hidden_dropout_prob"] = args.dropout
        out["model"]["attention_probs_dropout_prob"] = args.dropout
    if getattr(args, "vocab_size", None) is not None:
        out["model"]["vocab_size"] = args.vocab_size
    return out


def resolve_config(args: argparse.Namespace) -> tuple[RunConfig, dict[str, dict[str, Any]]]:
    """defaults < preset < --config file < flags.

    Also returns the values the user chose (a typed --preset's sizes, the config file's
    values, the flags): what a resume checks against the run's saved config.
    """
    raw: dict[str, dict[str, Any]] = {"model": dataclasses.asdict(preset(args.preset or "mini")),
                                      "data": {}, "train": {}}
    given: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "train": {}}
    if args.preset:  # typed, not the default
        given["model"].update({k: raw["model"][k] for k in PRESET_FIELDS})
    if args.config:  # keys and types now; the rest once layered (its sizes with the preset's)
        for section, typed in typed_sections(read_yaml(Path(args.config)), args.config).items():
            merge(raw[section], typed)
            merge(given[section], typed)
    for section, values in _given(args).items():
        merge(raw[section], values)
        merge(given[section], values)
    cfg = RunConfig(model=build(ModelConfig, raw["model"], "model"),
                    data=build(DataConfig, raw["data"], "data"),
                    train=build(TrainConfig, raw["train"], "train"))
    return cfg, given


def corpus_inputs(flag: str, corpus: list[str] | None) -> list[tuple[str, str]]:
    """A corpus as inputs for check_paths: each path given and each file it names."""
    from bertforge.data.corpus import resolve_corpus

    if not corpus:
        return []
    given = [(flag, c) for c in corpus if os.path.lexists(c)]
    return given + [(flag, str(p)) for p in resolve_corpus(corpus)]


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from bertforge.data.corpus import resolve_corpus
    from bertforge.data.tokenizer import train_tokenizer

    check_paths(corpus_inputs("corpus", args.corpus), [Output("--out", args.out, "tokenizer")])
    files = [str(p) for p in resolve_corpus(args.corpus)]
    out = train_tokenizer(files, Path(args.out), vocab_size=args.vocab_size,
                          lowercase=not args.cased, min_frequency=args.min_frequency,
                          show_progress=not args.quiet, options=_corpus_options(args),
                          sample_bytes=args.sample_bytes)
    print(out)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from bertforge.data.corpus import resolve_corpus
    from bertforge.data.prepare import prepare

    check_paths([*corpus_inputs("corpus", args.corpus), ("--tokenizer", args.tokenizer)],
                [Output("--out", args.out, "data")])
    files = [str(p) for p in resolve_corpus(args.corpus)]
    prepare(files, Path(args.tokenizer), Path(args.out), seq_len=args.seq_len,
            valid_fraction=args.valid_fraction, show_progress=not args.quiet,
            corpus_options=_corpus_options(args), document_boundary=args.document_boundary,
            workers=args.workers, num_shards=args.num_shards, shard_index=args.shard_index)
    print(args.out)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from bertforge.commands.pretrain import run_pretrain

    if not args.data and not args.corpus and not args.resume:
        raise BertforgeError("give --corpus FILES... or --data DATA_DIR")
    check_paths([*corpus_inputs("--corpus", args.corpus),
                 *[("--data", d) for d in args.data or []],
                 *[(flag, v) for flag, v in (("--tokenizer", args.tokenizer),
                                             ("--config", args.config),
                                             ("--init", getattr(args, "train.init", None)))
                   if v]],
                [Output("--out", args.out, "run")])
    cfg, given = resolve_config(args)
    data_dir = [Path(d) for d in args.data] if args.data else None
    if data_dir is not None and len(data_dir) == 1:
        data_dir = data_dir[0]
    if args.tokenizer and not args.corpus:
        raise BertforgeError("--tokenizer goes with --corpus (prepared --data has its "
                             "tokenizer already)")
    result = run_pretrain(Path(args.out), cfg, data_dir=data_dir,
                          corpus=args.corpus, resume=args.resume, lowercase=not args.cased,
                          given=given, show_progress=not args.quiet,
                          corpus_options=_corpus_options(args), sample_bytes=args.sample_bytes,
                          tokenizer=Path(args.tokenizer) if args.tokenizer else None)
    if _rank() == 0:  # under torchrun, one answer for the job
        print(json.dumps(result))
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bertforge.commands.evaluate import evaluate_run

    check_paths([("run_dir", args.run_dir), *[("--data", d) for d in args.data or []],
                 *([("--checkpoint", args.checkpoint)] if args.checkpoint else [])],
                [Output("--out", args.out, "file")] if args.out else [])
    result = evaluate_run(Path(args.run_dir), [Path(d) for d in args.data] if args.data else None,
                          args.split, Path(args.checkpoint) if args.checkpoint else None,
                          args.max_sequences, args.device, args.precision)
    print(json.dumps(result))
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bertforge import rundir
    from bertforge.hf import export_model

    require_utf8(args.out, "--out")  # the tokenizer library takes paths as text
    check_paths([("run_dir", args.run_dir)], [Output("--out", args.out, "export")])
    model, _, tok_dir = rundir.load_run_model(Path(args.run_dir))
    export_model(model, Path(args.out), tokenizer_dir=tok_dir)
    print(args.out)
    return 0


def cmd_fill_mask(args: argparse.Namespace) -> int:
    from bertforge.commands.fill_mask import fill_mask, numbered

    results = fill_mask(Path(args.model), args.text, args.top_k)
    if args.json:
        print(json.dumps(results))
        return 0
    # The text once, its masks numbered when there are several, then a line per mask.
    print(numbered(args.text, len(results)))
    for r in results:
        label = f"[MASK {r['mask_index'] + 1}]" if len(results) > 1 else "[MASK]"
        # Each token quoted (as JSON quotes it): a predicted "," stays readable in a list.
        print(f"{label}: " + ", ".join(
            f"{json.dumps(c['token'], ensure_ascii=False)} ({c['score']:.3f})"
            for c in r["predictions"]))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from bertforge.commands.bench import run_bench

    overrides: dict[str, Any] = {"vocab_size": args.vocab_size,
                                 "max_position_embeddings": max(512, args.seq_len)}
    if args.dropout is not None:
        overrides.update(hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
    cfg = preset(args.preset, **overrides)
    log = (lambda _: None) if args.json else print
    result = run_bench(cfg, args.batch_size, args.seq_len, vs_hf=args.vs_hf, steps=args.steps,
                       warmup=args.warmup, device_name=args.device,
                       compile_model=args.compile, fp32=not args.no_fp32,
                       hf_compile=args.hf_compile, log=log)
    if args.json:
        print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bertforge", description="Pretrain BERT models from scratch on your own "
                "text, evaluate them and export them to Hugging Face.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLE)
    p.add_argument("--version", action="version", version=f"bertforge {_version()}")
    # Not required: a bare `bertforge` prints the help (main), not a usage error.
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    s = sub.add_parser("tokenizer", help="train a WordPiece tokenizer on a corpus")
    s.add_argument("corpus", nargs="+", help="files, directories or globs")
    s.add_argument("--out", required=True, help="directory to write the tokenizer to")
    s.add_argument("--vocab-size", type=field_number(ModelConfig, "vocab_size"), default=30522)
    s.add_argument("--min-frequency", type=number(int, ">= 1"), default=2,
                   help="rarest pair to merge")
    s.add_argument("--cased", action="store_true", help="keep case (default: lowercase)")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    _add_corpus_options(s, sample=True)
    s.set_defaults(func=cmd_tokenizer)

    s = sub.add_parser("prepare", help="tokenize a corpus into token shards")
    s.add_argument("corpus", nargs="+", help="files, directories or globs")
    s.add_argument("--tokenizer", required=True, help="tokenizer directory")
    s.add_argument("--out", required=True, help="data directory to write")
    s.add_argument("--seq-len", type=field_number(DataConfig, "seq_len"), default=128)
    s.add_argument("--valid-fraction", type=field_number(DataConfig, "valid_fraction"),
                   default=0.01,
                   help="fraction of documents held out (default: 0.01)")
    s.add_argument("--document-boundary", default="cross", choices=["cross", "new"],
                   help="'cross': documents joined by [SEP] across sequences; 'new': each "
                   "document starts a sequence, its last one padded (default: cross)")
    s.add_argument("--workers", type=number(int, ">= 1"), default=None,
                   help="tokenizing processes (default: all cores); the output is the same")
    s.add_argument("--num-shards", type=number(int, ">= 1"), default=1, metavar="N",
                   help="split the corpus into N parts, by document, to prepare on N machines "
                   "(default: 1)")
    s.add_argument("--shard-index", type=number(int, ">= 0"), default=0, metavar="I",
                   help="the part to prepare, 0 <= I < N; read the parts together with "
                   "pretrain --data DIR --data DIR ... (default: 0)")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    _add_corpus_options(s, sample=False)
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("pretrain", help="pretrain a BERT (MLM) model")
    src = s.add_argument_group("data")
    src.add_argument("--corpus", nargs="+", help="raw text: tokenizer and shards are built in "
                     "RUN_DIR unless already there")
    src.add_argument("--data", action="append", metavar="DATA_DIR",
                     help="a directory written by `bertforge prepare`; repeat it to read "
                     "several (e.g. the parts of one corpus) as one dataset")
    src.add_argument("--tokenizer", metavar="DIR",
                     help="with --corpus: use this tokenizer (a bertforge tokenizer directory "
                     "or any BERT model directory with tokenizer.json or vocab.txt) instead "
                     "of training one; training one is not bit-for-bit reproducible, reusing "
                     "one is")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--preset", default=None,
                   help=f"model size: {', '.join(PRESETS)} (default: mini)")
    s.add_argument("--config", help="YAML file with model/data/train sections")
    s.add_argument("--resume", action="store_true", help="continue the run in --out")
    s.add_argument("--dropout", type=field_number(ModelConfig, "hidden_dropout_prob"),
                   help="set both dropout probabilities")
    s.add_argument("--vocab-size", type=field_number(ModelConfig, "vocab_size"),
                   help="tokenizer vocabulary with --corpus "
                   "(default: 30522)")
    s.add_argument("--cased", action="store_true", help="cased tokenizer with --corpus")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    _add_corpus_options(s, sample=True)
    _add_fields(s, ModelConfig, MODEL_FLAGS, "model")
    _add_fields(s, DataConfig, DATA_FLAGS, "data")
    _add_fields(s, TrainConfig, TRAIN_FLAGS, "train",
                defaults={"warmup_fraction": DEFAULT_WARMUP_FRACTION})
    add_legacy_warmup(s)
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("evaluate", help="held-out MLM loss, accuracy and perplexity (JSON)")
    s.add_argument("run_dir")
    s.add_argument("--data", action="append", metavar="DATA_DIR",
                   help="data directory, repeatable (default: the run's)")
    s.add_argument("--split", default="valid", help="split to evaluate (default: valid)")
    s.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
    s.add_argument("--max-sequences", type=number(int, ">= 0"), default=None,
                   help="held-out sequences to score, 0: all (default: the run's "
                   "--eval-sequences, as its logged evaluation)")
    s.add_argument("--device", default="auto")
    s.add_argument("--precision", default=None, choices=["auto", "bf16", "fp32"],
                   help="(default: the run's, as its logged evaluation)")
    s.add_argument("--out", help="also write the JSON object to this file")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("export", help="write a Hugging Face model directory")
    s.add_argument("run_dir")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("fill-mask", help="predict the [MASK] tokens of a text")
    s.add_argument("model", help="run directory or Hugging Face directory")
    s.add_argument("text")
    s.add_argument("--top-k", type=number(int, ">= 1"), default=5)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_fill_mask)
    s = sub.add_parser("bench", help="training tokens/s, MFU and peak memory, optionally "
                       "against transformers")
    s.add_argument("--preset", default="mini", help="model size (default: mini)")
    s.add_argument("--batch-size", type=number(int, ">= 1"), default=32,
                   help="sequences per step (default: 32)")
    s.add_argument("--seq-len", type=field_number(DataConfig, "seq_len"), default=128,
                   help="tokens per sequence (default: 128)")
    s.add_argument("--vocab-size", type=field_number(ModelConfig, "vocab_size"), default=30522,
                   help="(default: 30522)")
    s.add_argument("--dropout", type=field_number(ModelConfig, "hidden_dropout_prob"),
                   help="dropout for both models (default: the preset's 0.1)")
    s.add_argument("--steps", type=number(int, ">= 1"), default=10,
                   help="timed steps (default: 10)")
    s.add_argument("--warmup", type=number(int, ">= 0"), default=3,
                   help="untimed steps first (default: 3)")
    s.add_argument("--vs-hf", action="store_true",
                   help="also time transformers' BertForMaskedLM (its best setting)")
    s.add_argument("--compile", action="store_true",
                   help="also time bertforge's model through torch.compile")
    s.add_argument("--no-fp32", action="store_true",
                   help="time bf16 only (fp32 is never the fast setting on a GPU)")
    s.add_argument("--hf-compile", action="store_true",
                   help="with --vs-hf, also time transformers' model through torch.compile")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_bench)

    from bertforge.cli.downstream import add_commands  # finetune, predict, glue, report
    add_commands(sub, _add_fields, add_legacy_warmup)
    return p


def _version() -> str:
    """The installed distribution's version, or the source tree's when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bertforge")
    except PackageNotFoundError:
        from bertforge import __version__
        return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `bertforge`: what it can do
        parser.print_help()
        return 0
    # SIGTERM stops any command as Ctrl-C does: raised where it is, so that its cleanup
    # (partial output, locks) runs; training handles it itself, saving a checkpoint.
    with _terminating():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except BertforgeError as e:
        print(f"bertforge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # what no check foresaw: a full disk, a vanished file, permissions
        where = f"{e.filename}: " if e.filename else ""
        print(f"bertforge: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bertforge: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"bertforge: {e}", file=sys.stderr)
        return 128 + e.signum
    except Interrupted as e:
        if _rank() == 0:
            print(f"bertforge: {e}; checkpoint saved, continue with --resume", file=sys.stderr)
        return 128 + e.signum


@contextlib.contextmanager
def _terminating() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (in the main thread only)."""
    def handle(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
