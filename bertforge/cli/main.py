"""The `bertforge` command: each subcommand parses its flags, calls its function of the
Python API (bertforge.api) and prints what it returns.

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
import signal
import sys
from collections.abc import Iterator
from typing import Any

from bertforge import api
from bertforge.cli.downstream import add_commands
from bertforge.cli.options import (
    Parser,
    add_corpus_options,
    add_fields,
    corpus_options,
    typed_fields,
)
from bertforge.config import (
    DEFAULT_WARMUP_FRACTION,
    PRESETS,
    DataConfig,
    ModelConfig,
    TrainConfig,
    field_number,
    number,
    preset,
)
from bertforge.errors import BertforgeError, Interrupted, Terminated

# Config fields exposed as flags (the rest are reachable through --config FILE.yaml).
MODEL_FLAGS = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
]
DATA_FLAGS = [
    "seq_len",
    "valid_fraction",
    "mask_rate",
    "mask_token_ratio",
    "random_token_ratio",
    "masking",
    "span_p",
    "span_max",
    "objective",
    "document_boundary",
]
TRAIN_FLAGS = [f.name for f in dataclasses.fields(TrainConfig)]
# Pretraining's help where the field's own would state the default twice.
PRETRAIN_HELP = {
    "warmup_fraction": "Linear warmup over this fraction of the run (of max_steps, "
    "or of the time budget), unless --warmup-steps is given."
}


EXAMPLE = """example:
  bertforge pretrain --corpus data/enwiki-2015-sample.txt.xz --out runs/mini --max-steps 3000
  bertforge evaluate runs/mini
  bertforge fill-mask runs/mini/hf "The capital of France is [MASK]."

`bertforge COMMAND --help` lists every flag of a command."""


def cmd_tokenizer(args: argparse.Namespace) -> int:
    print(
        api.train_tokenizer(
            args.corpus,
            args.out,
            vocab_size=args.vocab_size,
            min_frequency=args.min_frequency,
            cased=args.cased,
            sample_bytes=args.sample_bytes,
            quiet=args.quiet,
            **corpus_options(args),
        )
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    api.prepare(
        args.corpus,
        args.tokenizer,
        args.out,
        seq_len=args.seq_len,
        valid_fraction=args.valid_fraction,
        document_boundary=args.document_boundary,
        workers=args.workers,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        quiet=args.quiet,
        **corpus_options(args),
    )
    print(args.out)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    result = api.pretrain(
        args.out,
        corpus=args.corpus,
        data=args.data,
        tokenizer=args.tokenizer,
        preset=args.preset,
        config=args.config,
        resume=args.resume,
        dropout=args.dropout,
        cased=args.cased,
        sample_bytes=args.sample_bytes,
        quiet=args.quiet,
        **corpus_options(args),
        **pretrain_options(args),
    )
    if _rank() == 0:  # under torchrun, one answer for the job
        print(json.dumps(result.summary()))
    return 0


def pretrain_options(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields typed as flags of `pretrain`, as keywords of api.pretrain."""
    options = typed_fields(args, "model", "data", "train")
    if args.vocab_size is not None:
        options["vocab_size"] = args.vocab_size
    return options


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def cmd_evaluate(args: argparse.Namespace) -> int:
    result = api.evaluate(
        args.run_dir,
        data=args.data,
        split=args.split,
        checkpoint=args.checkpoint,
        max_sequences=args.max_sequences,
        device=args.device,
        precision=args.precision,
        out=args.out,
    )
    print(json.dumps(result))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    print(api.export(args.run_dir, args.out))
    return 0


def cmd_fill_mask(args: argparse.Namespace) -> int:
    from bertforge.commands.fill_mask import numbered

    fills = api.fill_mask(args.model, args.text, top_k=args.top_k)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "mask_index": f.index,
                        "position": f.position,
                        "predictions": [{"token": t, "score": p} for t, p in f.predictions],
                    }
                    for f in fills
                ]
            )
        )
        return 0
    # The text once, its masks numbered when there are several, then a line per mask.
    print(numbered(args.text, len(fills)))
    for f in fills:
        label = f"[MASK {f.index + 1}]" if len(fills) > 1 else "[MASK]"
        # Each token quoted (as JSON quotes it): a predicted "," stays readable in a list.
        print(
            f"{label}: "
            + ", ".join(f"{json.dumps(t, ensure_ascii=False)} ({p:.3f})" for t, p in f.predictions)
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from bertforge.commands.bench import run_bench

    overrides: dict[str, Any] = {
        "vocab_size": args.vocab_size,
        "max_position_embeddings": max(512, args.seq_len),
    }
    if args.dropout is not None:
        overrides.update(
            hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout
        )
    cfg = preset(args.preset, **overrides)
    log = (lambda _: None) if args.json else print
    result = run_bench(
        cfg,
        args.batch_size,
        args.seq_len,
        vs_hf=args.vs_hf,
        steps=args.steps,
        warmup=args.warmup,
        device_name=args.device,
        compile_model=args.compile,
        fp32=not args.no_fp32,
        hf_compile=args.hf_compile,
        log=log,
    )
    if args.json:
        print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="bertforge",
        description="Pretrain BERT models from scratch on your own "
        "text, evaluate them and export them to Hugging Face.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLE,
    )
    p.add_argument("--version", action="version", version=f"bertforge {_version()}")
    # Not required: a bare `bertforge` prints the help (main), not a usage error.
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")

    s = sub.add_parser("tokenizer", help="train a WordPiece tokenizer on a corpus")
    s.add_argument("corpus", nargs="+", help="files, directories or globs")
    s.add_argument("--out", required=True, help="directory to write the tokenizer to")
    s.add_argument("--vocab-size", type=field_number(ModelConfig, "vocab_size"), default=30522)
    s.add_argument(
        "--min-frequency",
        type=number(int, api.RULES["min_frequency"]),
        default=2,
        help="rarest pair to merge",
    )
    s.add_argument("--cased", action="store_true", help="keep case (default: lowercase)")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    add_corpus_options(s, sample=True)
    s.set_defaults(func=cmd_tokenizer)

    s = sub.add_parser("prepare", help="tokenize a corpus into token shards")
    s.add_argument("corpus", nargs="+", help="files, directories or globs")
    s.add_argument("--tokenizer", required=True, help="tokenizer directory")
    s.add_argument("--out", required=True, help="data directory to write")
    s.add_argument("--seq-len", type=field_number(DataConfig, "seq_len"), default=128)
    s.add_argument(
        "--valid-fraction",
        type=field_number(DataConfig, "valid_fraction"),
        default=0.01,
        help="fraction of documents held out (default: 0.01)",
    )
    s.add_argument(
        "--document-boundary",
        default="cross",
        choices=["cross", "new"],
        help="'cross': documents joined by [SEP] across sequences; 'new': each "
        "document starts a sequence, its last one padded (default: cross)",
    )
    s.add_argument(
        "--workers",
        type=number(int, api.RULES["workers"]),
        default=None,
        help="tokenizing processes (default: all cores); the output is the same",
    )
    s.add_argument(
        "--num-shards",
        type=number(int, api.RULES["num_shards"]),
        default=1,
        metavar="N",
        help="split the corpus into N parts, by document, to prepare on N machines (default: 1)",
    )
    s.add_argument(
        "--shard-index",
        type=number(int, api.RULES["shard_index"]),
        default=0,
        metavar="I",
        help="the part to prepare, 0 <= I < N; read the parts together with "
        "pretrain --data DIR --data DIR ... (default: 0)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress output")
    add_corpus_options(s, sample=False)
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("pretrain", help="pretrain a BERT (MLM) model")
    src = s.add_argument_group("data")
    src.add_argument(
        "--corpus",
        nargs="+",
        help="raw text: tokenizer and shards are built in RUN_DIR unless already there",
    )
    src.add_argument(
        "--data",
        action="append",
        metavar="DATA_DIR",
        help="a directory written by `bertforge prepare`; repeat it to read "
        "several (e.g. the parts of one corpus) as one dataset",
    )
    src.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="with --corpus: use this tokenizer (a bertforge tokenizer directory "
        "or any BERT model directory with tokenizer.json or vocab.txt) instead "
        "of training one; training one is not bit-for-bit reproducible, reusing "
        "one is",
    )
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument(
        "--preset", default=None, help=f"model size: {', '.join(PRESETS)} (default: mini)"
    )
    s.add_argument("--config", help="YAML file with model/data/train sections")
    s.add_argument("--resume", action="store_true", help="continue the run in --out")
    s.add_argument(
        "--dropout",
        type=field_number(ModelConfig, "hidden_dropout_prob"),
        help="set both dropout probabilities",
    )
    s.add_argument(
        "--vocab-size",
        type=field_number(ModelConfig, "vocab_size"),
        help="tokenizer vocabulary with --corpus (default: 30522)",
    )
    s.add_argument("--cased", action="store_true", help="cased tokenizer with --corpus")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    add_corpus_options(s, sample=True)
    add_fields(s, ModelConfig, MODEL_FLAGS, "model")
    add_fields(s, DataConfig, DATA_FLAGS, "data")
    add_fields(
        s,
        TrainConfig,
        TRAIN_FLAGS,
        "train",
        defaults={"warmup_fraction": DEFAULT_WARMUP_FRACTION},
        helps=PRETRAIN_HELP,
    )
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("evaluate", help="held-out MLM loss, accuracy and perplexity (JSON)")
    s.add_argument("run_dir")
    s.add_argument(
        "--data",
        action="append",
        metavar="DATA_DIR",
        help="data directory, repeatable (default: the run's)",
    )
    s.add_argument("--split", default="valid", help="split to evaluate (default: valid)")
    s.add_argument("--checkpoint", help="a checkpoint directory (default: the newest)")
    s.add_argument(
        "--max-sequences",
        type=number(int, api.RULES["max_sequences"]),
        default=None,
        help="held-out sequences to score, 0: all (default: the run's "
        "--eval-sequences, as its logged evaluation)",
    )
    s.add_argument("--device", default="auto")
    s.add_argument(
        "--precision",
        default=None,
        choices=["auto", "bf16", "fp32"],
        help="(default: the run's, as its logged evaluation)",
    )
    s.add_argument("--out", help="also write the JSON object to this file")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("export", help="write a Hugging Face model directory")
    s.add_argument("run_dir")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("fill-mask", help="predict the [MASK] tokens of a text")
    s.add_argument("model", help="run directory or Hugging Face directory")
    s.add_argument("text")
    s.add_argument("--top-k", type=number(int, api.RULES["top_k"]), default=5)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_fill_mask)
    s = sub.add_parser(
        "bench", help="training tokens/s, MFU and peak memory, optionally against transformers"
    )
    s.add_argument("--preset", default="mini", help="model size (default: mini)")
    s.add_argument(
        "--batch-size",
        type=number(int, ">= 1"),
        default=32,
        help="sequences per step (default: 32)",
    )
    s.add_argument(
        "--seq-len",
        type=field_number(DataConfig, "seq_len"),
        default=128,
        help="tokens per sequence (default: 128)",
    )
    s.add_argument(
        "--vocab-size",
        type=field_number(ModelConfig, "vocab_size"),
        default=30522,
        help="(default: 30522)",
    )
    s.add_argument(
        "--dropout",
        type=field_number(ModelConfig, "hidden_dropout_prob"),
        help="dropout for both models (default: the preset's 0.1)",
    )
    s.add_argument(
        "--steps", type=number(int, ">= 1"), default=10, help="timed steps (default: 10)"
    )
    s.add_argument(
        "--warmup", type=number(int, ">= 0"), default=3, help="untimed steps first (default: 3)"
    )
    s.add_argument(
        "--vs-hf",
        action="store_true",
        help="also time transformers' BertForMaskedLM (its best setting)",
    )
    s.add_argument(
        "--compile", action="store_true", help="also time bertforge's model through torch.compile"
    )
    s.add_argument(
        "--no-fp32",
        action="store_true",
        help="time bf16 only (fp32 is never the fast setting on a GPU)",
    )
    s.add_argument(
        "--hf-compile",
        action="store_true",
        help="with --vs-hf, also time transformers' model through torch.compile",
    )
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_bench)

    add_commands(sub)  # finetune, predict, glue, report
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
