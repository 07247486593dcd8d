"""The downstream commands: finetune, predict, glue and report.

`add_commands` adds them to the `bertforge` parser (bertforge.cli.main). Fine-tuning flags
are generated from `FinetuneConfig`'s fields, as pretraining's are from TrainConfig's.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from bertforge.config import TrainConfig, field_number, merge, number
from bertforge.errors import BertforgeError
from bertforge.fileio import write_text_atomic
from bertforge.finetune_config import (FINETUNE_DEFAULTS, FINETUNE_HELP, NOT_FOR_FINETUNING,
                                       FinetuneConfig, finetune_train_config)
from bertforge.paths import Output, check_paths


def _finetune_config(args: argparse.Namespace) -> tuple[FinetuneConfig, dict[str, Any]]:
    """The config, and the values the user typed, by field name (what --resume checks)."""
    typed = {section: {k.split(".", 1)[1]: v for k, v in vars(args).items()
                       if k.startswith(f"{section}.")} for section in ("train", "finetune")}
    train = merge({}, typed["train"])  # --warmup in its new form
    cfg = FinetuneConfig(train=finetune_train_config(**train), **typed["finetune"])
    return cfg, {**train, **typed["finetune"]}


def _task_data(args: argparse.Namespace) -> Any:
    from bertforge.data.labelled import load_own_task
    from bertforge.commands.glue import load_glue_task

    if args.train or args.validation:
        if not (args.train and args.validation):
            raise BertforgeError("give both --train FILE and --validation FILE")
        data = load_own_task(Path(args.train), Path(args.validation), args.text_column,
                             args.label_column, args.text_pair_column, args.regression)
        if args.task:
            data.name = args.task
        return data
    if not (args.task and args.data_dir):
        raise BertforgeError("give --task NAME --data-dir DIR (a GLUE task) or --train FILE "
                             "--validation FILE (your own data)")
    if args.regression:
        raise BertforgeError("--regression is for --train/--validation files; GLUE tasks "
                             "know their kind")
    return load_glue_task(args.task, Path(args.data_dir))


def cmd_finetune(args: argparse.Namespace) -> int:
    from bertforge.commands.finetune import run_finetune

    check_paths([(flag, v) for flag, v in (("model", args.model), ("--data-dir", args.data_dir),
                                           ("--train", args.train),
                                           ("--validation", args.validation)) if v],
                [Output("--out", args.out, "finetune")])
    cfg, given = _finetune_config(args)
    data = _task_data(args)
    summary = run_finetune(Path(args.model), data, Path(args.out), cfg,
                           from_scratch=args.from_scratch, resume=args.resume, given=given,
                           show_progress=not args.quiet)
    print(json.dumps({k: summary[k] for k in ("task", "score", "best_epoch", "best",
                                              "train_time_s", "wall_time_s", "export")}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from bertforge.commands.finetune import Predictor

    check_paths([("model_dir", args.model_dir), ("--input", args.input)],
                [Output("--output", args.output, "file")] if args.output else [])
    predictor = Predictor(Path(args.model_dir), args.max_length, args.device)
    if args.output:
        from bertforge.fileio import write_atomic

        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                stream_predictions(args, predictor, f)

        write_atomic(args.output, write)  # no half-written file if interrupted
    else:
        stream_predictions(args, predictor, sys.stdout)
    return 0


PREDICT_CHUNK = 1024  # inputs read, predicted and written at a time: bounded memory


def stream_predictions(args: argparse.Namespace, predictor: Any, out: TextIO) -> int:
    """Write one JSON line per input of args.input to `out`, in input order, each naming
    its input's line (and text, unless --no-text); an empty text gets a null prediction.
    Inputs are read, predicted and written a chunk at a time, with progress on stderr."""
    from bertforge.data.labelled import iter_inputs

    inputs = iter_inputs(Path(args.input), args.text_column, args.text_pair_column)
    done, start = 0, time.monotonic()
    while chunk := list(itertools.islice(inputs, max(PREDICT_CHUNK, args.batch_size))):
        filled = [i for i, (_, text, _) in enumerate(chunk) if text]
        results = [predictor.blank()] * len(chunk)
        if filled:
            pairs = [chunk[i][2] for i in filled] if args.text_pair_column else None
            for i, r in zip(filled, predictor([chunk[i][1] for i in filled], pairs,
                                              args.batch_size)):
                results[i] = r
        for (line, text, pair), result in zip(chunk, results):
            record: dict[str, Any] = {"line": line}
            if not args.no_text:
                record["text"] = text
                if pair is not None:
                    record["text_pair"] = pair
            out.write(json.dumps({**record, **result}) + "\n")
        out.flush()
        done += len(chunk)
        if not args.quiet and done >= PREDICT_CHUNK:  # small inputs: no progress to show
            print(f"predict: {done:,} inputs, {time.monotonic() - start:.0f}s",
                  file=sys.stderr)
    if done == 0:
        raise BertforgeError(f"{args.input}: no inputs")
    return done


def cmd_glue(args: argparse.Namespace) -> int:
    from bertforge.commands.glue import markdown_table, run_glue

    cfg, _ = _finetune_config(args)
    out = Path(args.out) if args.out else Path(str(Path(args.model)).rstrip("/") + "-glue")
    check_paths([("model", args.model), ("--data-dir", args.data_dir)],
                [Output("--out", out, "glue"),
                 *([Output("--results", args.results, "file")] if args.results else [])])
    report = run_glue(Path(args.model), Path(args.data_dir), out, args.tasks, cfg,
                      from_scratch=args.from_scratch, show_progress=not args.quiet)
    if args.results:
        write_text_atomic(args.results, json.dumps(report, indent=1) + "\n")
    print(json.dumps(report) if args.json else markdown_table(report))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bertforge import rundir
    from bertforge.commands.finetune import SPEC
    from bertforge.commands.report import REPORT, write_report

    # What it reads is the run's record, not the whole directory: its report goes inside.
    check_paths([("run_dir", Path(args.run_dir) / name)
                 for name in (rundir.METRICS, rundir.CONFIG, SPEC)],
                [Output("--out", args.out or Path(args.run_dir) / REPORT, "report",
                        home=("run", "finetune"))])
    print(write_report(Path(args.run_dir), Path(args.out) if args.out else None))
    return 0


def add_commands(sub: Any, add_fields: Any, add_legacy_warmup: Any) -> None:
    """Add the downstream subcommands; add_fields is bertforge.cli.main's flag generator."""
    own_fields = [f.name for f in dataclasses.fields(FinetuneConfig) if f.name != "train"]
    train_fields = [f.name for f in dataclasses.fields(TrainConfig)
                    if f.name not in NOT_FOR_FINETUNING]

    def add_config_flags(parser: argparse.ArgumentParser) -> None:
        add_fields(parser, FinetuneConfig, own_fields, "finetune")
        add_fields(parser, TrainConfig, train_fields, "train", defaults=FINETUNE_DEFAULTS,
                   helps=FINETUNE_HELP)
        add_legacy_warmup(parser)

    s = sub.add_parser("finetune", help="fine-tune on a GLUE task or your own labelled data")
    s.add_argument("model", help="a bertforge run directory or a Hugging Face BERT directory")
    s.add_argument("--out", required=True, help="output directory (the export goes to OUT/hf)")
    glue = s.add_argument_group("a GLUE task")
    glue.add_argument("--task", help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli "
                      "(with --train: a name for your task)")
    glue.add_argument("--data-dir", help="the task's directory (train.tsv, dev.tsv), or the "
                      "GLUE directory holding it")
    own = s.add_argument_group("your own data (CSV, TSV with a header row, or JSONL)")
    own.add_argument("--train", help="training file")
    own.add_argument("--validation", help="validation file (selects the best epoch)")
    own.add_argument("--text-column", default="text", help="(default: text)")
    own.add_argument("--text-pair-column", help="second text, for sentence-pair tasks")
    own.add_argument("--label-column", default="label", help="(default: label)")
    own.add_argument("--regression", action="store_true",
                     help="numeric labels, squared-error loss (default: class labels)")
    s.add_argument("--from-scratch", action="store_true", help="the same architecture, "
                   "randomly initialised: the baseline that shows what pretraining bought")
    s.add_argument("--resume", action="store_true", help="continue the run in --out")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    add_config_flags(s)
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("predict", help="labels and probabilities (JSONL) from a fine-tuned "
                       "model")
    s.add_argument("model_dir", help="a `bertforge finetune` output directory or its hf/")
    s.add_argument("--input", required=True, help="CSV, TSV or JSONL file, or .txt with one "
                   "text a line ('-': stdin)")
    s.add_argument("--output", help="JSONL file to write (default: stdout): one line per "
                   "input, in order, with the input's line number and text")
    s.add_argument("--text-column", default="text", help="(default: text)")
    s.add_argument("--text-pair-column", help="second text, for sentence-pair tasks")
    s.add_argument("--batch-size", type=number(int, ">= 1"), default=64)
    s.add_argument("--max-length", type=field_number(FinetuneConfig, "max_length"),
                   default=None, help="truncate to N tokens (default: the fine-tuning run's)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-text", action="store_true",
                   help="leave each input's text out of its output line (the line number "
                   "stays)")
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
