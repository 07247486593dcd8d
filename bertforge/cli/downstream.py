"""The downstream commands: finetune, predict, glue and report.

`add_commands` adds them to the `bertforge` parser (bertforge.cli.main). Each calls its
function of the Python API (bertforge.api) and prints what it returns. Fine-tuning flags
are generated from `FinetuneConfig`'s fields, as pretraining's are from TrainConfig's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from bertforge import api
from bertforge.cli.options import add_fields, typed_fields
from bertforge.config import TrainConfig, field_number, number
from bertforge.fileio import write_atomic
from bertforge.finetune_config import (
    FINETUNE_DEFAULTS,
    FINETUNE_HELP,
    NOT_FOR_FINETUNING,
    FinetuneConfig,
)
from bertforge.paths import Output, check_paths


def cmd_finetune(args: argparse.Namespace) -> int:
    result = api.finetune(
        args.model,
        args.out,
        task=args.task,
        data_dir=args.data_dir,
        train=args.train,
        validation=args.validation,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        regression=args.regression,
        from_scratch=args.from_scratch,
        resume=args.resume,
        quiet=args.quiet,
        **typed_fields(args, "train", "finetune"),
    )
    print(
        json.dumps(
            {
                k: result.summary[k]
                for k in (
                    "task",
                    "score",
                    "best_epoch",
                    "best",
                    "train_time_s",
                    "wall_time_s",
                    "export",
                )
            }
        )
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.output:  # its own output file, refused before the model is loaded
        check_paths(
            [("model_dir", args.model_dir), ("--input", args.input)],
            [Output("--output", args.output, "file")],
        )
    records = api.predict_file(
        args.model_dir,
        args.input,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
        with_text=not args.no_text,
        quiet=args.quiet,
    )
    if args.output:

        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                write_lines(records, f)

        write_atomic(args.output, write)  # no half-written file if interrupted
    else:
        write_lines(records, sys.stdout)
    return 0


def write_lines(records: Iterable[dict[str, Any]], out: TextIO) -> None:
    """One JSON line per record, each flushed as written (a pipe sees them stream)."""
    for record in records:
        out.write(json.dumps(record) + "\n")
        out.flush()


def cmd_glue(args: argparse.Namespace) -> int:
    from bertforge.commands.glue import markdown_table

    report = api.glue(
        args.model,
        args.data_dir,
        tasks=args.tasks,
        out=args.out,
        results=args.results,
        from_scratch=args.from_scratch,
        quiet=args.quiet,
        **typed_fields(args, "train", "finetune"),
    )
    print(json.dumps(report) if args.json else markdown_table(report))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print(api.report(args.run_dir, args.out))
    return 0


def add_commands(sub: Any) -> None:
    """Add the downstream subcommands to `sub`, the `bertforge` parser's subparsers."""
    own_fields = [f.name for f in dataclasses.fields(FinetuneConfig) if f.name != "train"]
    train_fields = [
        f.name for f in dataclasses.fields(TrainConfig) if f.name not in NOT_FOR_FINETUNING
    ]

    def add_config_flags(parser: argparse.ArgumentParser) -> None:
        add_fields(parser, FinetuneConfig, own_fields, "finetune")
        add_fields(
            parser,
            TrainConfig,
            train_fields,
            "train",
            defaults=FINETUNE_DEFAULTS,
            helps=FINETUNE_HELP,
        )

    s = sub.add_parser("finetune", help="fine-tune on a GLUE task or your own labelled data")
    s.add_argument("model", help="a bertforge run directory or a Hugging Face BERT directory")
    s.add_argument("--out", required=True, help="output directory (the export goes to OUT/hf)")
    glue = s.add_argument_group("a GLUE task")
    glue.add_argument(
        "--task",
        help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli "
        "(with --train: a name for your task)",
    )
    glue.add_argument(
        "--data-dir",
        help="the task's directory (train.tsv, dev.tsv), or the GLUE directory holding it",
    )
    own = s.add_argument_group("your own data (CSV, TSV with a header row, or JSONL)")
    own.add_argument("--train", help="training file")
    own.add_argument("--validation", help="validation file (selects the best epoch)")
    own.add_argument("--text-column", default="text", help="(default: text)")
    own.add_argument("--text-pair-column", help="second text, for sentence-pair tasks")
    own.add_argument("--label-column", default="label", help="(default: label)")
    own.add_argument(
        "--regression",
        action="store_true",
        help="numeric labels, squared-error loss (default: class labels)",
    )
    s.add_argument(
        "--from-scratch",
        action="store_true",
        help="the same architecture, "
        "randomly initialised: the baseline that shows what pretraining bought",
    )
    s.add_argument("--resume", action="store_true", help="continue the run in --out")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    add_config_flags(s)
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("predict", help="labels and probabilities (JSONL) from a fine-tuned model")
    s.add_argument("model_dir", help="a `bertforge finetune` output directory or its hf/")
    s.add_argument(
        "--input",
        required=True,
        help="CSV, TSV or JSONL file, or .txt with one text a line ('-': stdin)",
    )
    s.add_argument(
        "--output",
        help="JSONL file to write (default: stdout): one line per "
        "input, in order, with the input's line number and text",
    )
    s.add_argument("--text-column", default="text", help="(default: text)")
    s.add_argument("--text-pair-column", help="second text, for sentence-pair tasks")
    s.add_argument("--batch-size", type=number(int, api.RULES["batch_size"]), default=64)
    s.add_argument(
        "--max-length",
        type=field_number(FinetuneConfig, "max_length"),
        default=None,
        help="truncate to N tokens (default: the fine-tuning run's)",
    )
    s.add_argument("--device", default="cpu")
    s.add_argument(
        "--no-text",
        action="store_true",
        help="leave each input's text out of its output line (the line number stays)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("glue", help="fine-tune on several GLUE tasks; a table of scores")
    s.add_argument("model", help="a bertforge run directory or a Hugging Face BERT directory")
    s.add_argument("--data-dir", required=True, help="the GLUE directory (CoLA/, SST-2/, ...)")
    s.add_argument("--tasks", nargs="+", help="default: every task present in --data-dir")
    s.add_argument("--out", help="where each task's run goes (default: MODEL-glue)")
    s.add_argument("--from-scratch", action="store_true", help="randomly initialised baseline")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--results", help="also write the results as JSON to this file")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    add_config_flags(s)
    s.set_defaults(func=cmd_glue)

    s = sub.add_parser("report", help="plots (PNG) and report.md of a run's metrics")
    s.add_argument("run_dir", help="a pretraining run or a fine-tuning output directory")
    s.add_argument("--out", help="default: RUN_DIR/report")
    s.set_defaults(func=cmd_report)
