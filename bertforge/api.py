"""The Python face of bertforge: one function per command, returning values.

`bertforge.pretrain(...)`, `finetune`, `evaluate`, `export`, `fill_mask`, `predict` (and
`train_tokenizer`, `prepare`, `glue`, `report`) take the options of their command as
keywords, or the config as a typed object (`RunConfig`, `FinetuneConfig`), check them as
the command does (the same BertforgeError messages) and return what the command prints
as a value. The `bertforge` CLI parses its flags and calls these. Progress goes to
stderr; quiet=True turns it off, as --quiet does. Nothing here imports torch until a
function runs, so `import bertforge` stays cheap.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertforge.config import (
    DOCUMENT_BOUNDARIES,
    SECTIONS,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    build,
    merge,
    read_yaml,
    rule_text,
    satisfies,
    typed,
    typed_sections,
)
from bertforge.config import preset as model_preset
from bertforge.errors import BertforgeError
from bertforge.fileio import require_utf8, write_text_atomic
from bertforge.finetune_config import NOT_FOR_FINETUNING, FinetuneConfig, finetune_train_config
from bertforge.paths import Output, check_paths

PathLike = str | os.PathLike

# The ModelConfig fields a preset sets.
PRESET_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
# The rules of the options that are not config fields (the CLI's flags parse by them too).
RULES = {
    "min_frequency": ">= 1",
    "workers": ">= 1",
    "num_shards": ">= 1",
    "shard_index": ">= 0",
    "sample_bytes": ">= 1",
    "max_sequences": ">= 0",
    "top_k": ">= 1",
    "batch_size": ">= 1",
}
PRECISIONS = ("auto", "bf16", "fp32")
PREDICT_CHUNK = 1024  # inputs read, predicted and written at a time: bounded memory


# ------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PretrainResult:
    """What a pretraining run ended with."""

    run_dir: Path
    step: int  # the last optimizer step
    tokens: int  # training tokens seen
    train_time_s: float  # time spent training (evaluation and checkpoints are off the clock)
    metrics: dict[str, float]  # the final held-out evaluation: mlm_loss, mlm_accuracy, ...
    hf_dir: Path  # the Hugging Face export of the final weights
    config: RunConfig  # as resolved and saved in RUN_DIR/config.yaml

    def summary(self) -> dict[str, Any]:
        """The final metrics as `bertforge pretrain` prints them (one JSON object)."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.train_time_s,
            **self.metrics,
        }


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run ended with."""

    out_dir: Path
    task: str
    score: float  # the best epoch's headline score (the mean of the task's metrics)
    best_epoch: float
    metrics: dict[str, float]  # the best epoch's validation metrics
    hf_dir: Path  # the export of the best epoch's weights (BertForSequenceClassification)
    summary: dict[str, Any]  # OUT/metrics.json: every epoch, times and the config


@dataclass(frozen=True)
class MaskFill:
    """The predictions for one [MASK] of a text."""

    index: int  # which [MASK] of the text, from 0
    position: int  # its token position in the model's input ([CLS] is 0)
    predictions: list[tuple[str, float]]  # (token, probability), most likely first


# ------------------------------------------------------------------------ the commands


def train_tokenizer(
    corpus: PathLike | Sequence[PathLike],
    out: PathLike,
    *,
    vocab_size: int = 30522,
    min_frequency: int = 2,
    cased: bool = False,
    sample_bytes: int | None = None,
    text_field: str = "text",
    text_column: str = "text",
    one_doc_per_line: bool = False,
    dedup: bool = False,
    quiet: bool = False,
) -> Path:
    """Train a WordPiece tokenizer on `corpus` (files, directories, globs or hf: datasets)
    into `out`; returns its directory (`bertforge tokenizer`). min_frequency: the rarest
    pair to merge; cased: keep case (default: lowercase); sample_bytes: train on about
    this much text, the first documents of each file."""
    from bertforge.data.corpus import resolve_corpus
    from bertforge.data.tokenizer import train_tokenizer as train

    files = _list(corpus, "corpus")
    _field_number(ModelConfig, "vocab_size", vocab_size)
    _number("min_frequency", min_frequency, int)
    if sample_bytes is not None:
        _number("sample_bytes", sample_bytes, int)
    check_paths(corpus_inputs("corpus", files), [Output("--out", out, "tokenizer")])
    return train(
        [str(p) for p in resolve_corpus(files)],
        Path(out),
        vocab_size=vocab_size,
        lowercase=not cased,
        min_frequency=min_frequency,
        show_progress=not quiet,
        options=_corpus_options(text_field, text_column, one_doc_per_line, dedup),
        sample_bytes=sample_bytes,
    )


def prepare(
    corpus: PathLike | Sequence[PathLike],
    tokenizer: PathLike,
    out: PathLike,
    *,
    seq_len: int = 128,
    valid_fraction: float = 0.01,
    document_boundary: str = "cross",
    workers: int | None = None,
    num_shards: int = 1,
    shard_index: int = 0,
    text_field: str = "text",
    text_column: str = "text",
    one_doc_per_line: bool = False,
    dedup: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Tokenize `corpus` into token shards in `out` (`bertforge prepare`); returns the
    data's manifest. document_boundary 'cross': documents joined by [SEP] across
    sequences; 'new': each document starts a sequence. workers: tokenizing processes
    (default: all cores). num_shards, shard_index: prepare part I of N of the corpus."""
    from bertforge.data.corpus import resolve_corpus
    from bertforge.data.prepare import prepare as run

    files = _list(corpus, "corpus")
    _field_number(DataConfig, "seq_len", seq_len)
    _field_number(DataConfig, "valid_fraction", valid_fraction)
    _choice("document_boundary", document_boundary, DOCUMENT_BOUNDARIES)
    if workers is not None:
        _number("workers", workers, int)
    _number("num_shards", num_shards, int)
    _number("shard_index", shard_index, int)
    check_paths(
        [*corpus_inputs("corpus", files), ("--tokenizer", tokenizer)],
        [Output("--out", out, "data")],
    )
    return run(
        [str(p) for p in resolve_corpus(files)],
        Path(tokenizer),
        Path(out),
        seq_len=seq_len,
        valid_fraction=valid_fraction,
        show_progress=not quiet,
        corpus_options=_corpus_options(text_field, text_column, one_doc_per_line, dedup),
        document_boundary=document_boundary,
        workers=workers,
        num_shards=num_shards,
        shard_index=shard_index,
    )


def pretrain(
    out: PathLike,
    *,
    corpus: PathLike | Sequence[PathLike] | None = None,
    data: PathLike | Sequence[PathLike] | None = None,
    tokenizer: PathLike | None = None,
    preset: str | None = None,
    config: RunConfig | PathLike | None = None,
    resume: bool = False,
    dropout: float | None = None,
    cased: bool = False,
    sample_bytes: int | None = None,
    text_field: str = "text",
    text_column: str = "text",
    one_doc_per_line: bool = False,
    dedup: bool = False,
    quiet: bool = False,
    **options: Any,
) -> PretrainResult:
    """Pretrain a BERT (MLM) model into the run directory `out` (`bertforge pretrain`).

    The text is `corpus` (raw text: the tokenizer and shards are built in `out`, with
    `tokenizer` if given, else one trained on it) or `data` (directories written by
    `prepare`, read as one dataset). The config is layered as the command's: defaults <
    `preset` ('tiny' ... 'large'; default 'mini') < `config` (a YAML file with model/data/
    train sections, or a RunConfig, which then replaces defaults and preset) < `options`,
    any field of ModelConfig, DataConfig or TrainConfig by name (max_steps=1000, lr=5e-4,
    seq_len=128, vocab_size=8000, ...). dropout sets both dropout probabilities. resume:
    continue the run in `out` with its saved config; options given then must agree with
    it (only its length may change, where its schedule allows).
    """
    from bertforge import rundir
    from bertforge.commands.pretrain import run_pretrain

    corpus_list = _list(corpus, "corpus") if corpus is not None else None
    data_list = _list(data, "data") if data is not None else None
    if sample_bytes is not None:
        _number("sample_bytes", sample_bytes, int)
    if not data_list and not corpus_list and not resume:
        raise BertforgeError("give --corpus FILES... or --data DATA_DIR")
    config_file = None if config is None or isinstance(config, RunConfig) else config
    check_paths(
        [
            *corpus_inputs("--corpus", corpus_list),
            *[("--data", d) for d in data_list or []],
            *[
                (flag, v)
                for flag, v in (
                    ("--tokenizer", tokenizer),
                    ("--config", config_file),
                    ("--init", options.get("init")),
                )
                if v
            ],
        ],
        [Output("--out", out, "run")],
    )
    cfg, given = resolve_run_config(preset, config, options, dropout)
    dirs = [Path(d) for d in data_list or []]
    data_dir: Path | list[Path] | None = (dirs[0] if len(dirs) == 1 else dirs) if dirs else None
    if tokenizer and not corpus_list:
        raise BertforgeError(
            "--tokenizer goes with --corpus (prepared --data has its tokenizer already)"
        )
    result = run_pretrain(
        Path(out),
        cfg,
        data_dir=data_dir,
        corpus=corpus_list,
        resume=resume,
        lowercase=not cased,
        given=given,
        show_progress=not quiet,
        corpus_options=_corpus_options(text_field, text_column, one_doc_per_line, dedup),
        sample_bytes=sample_bytes,
        tokenizer=Path(tokenizer) if tokenizer else None,
    )
    metrics = {k: v for k, v in result.items() if k not in ("step", "tokens", "elapsed_s")}
    return PretrainResult(
        run_dir=Path(out),
        step=result["step"],
        tokens=result["tokens"],
        train_time_s=result["elapsed_s"],
        metrics=metrics,
        hf_dir=Path(out) / rundir.HF,
        config=RunConfig.load(Path(out) / rundir.CONFIG),
    )


def resolve_run_config(
    preset: str | None,
    config: RunConfig | PathLike | None,
    options: dict[str, Any],
    dropout: float | None = None,
) -> tuple[RunConfig, dict[str, dict[str, Any]]]:
    """defaults < preset < config (a file, or a RunConfig in place of both) < options.

    Also returns the values the caller chose (a given preset's sizes, the config's values,
    the options): what a resume checks against the run's saved config.
    """
    values = split_options(options, SECTIONS)
    if dropout is not None:
        values["model"].update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    given: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if isinstance(config, RunConfig):
        if preset:
            raise BertforgeError(
                "give a preset or a RunConfig, not both (a RunConfig holds its model's sizes)"
            )
        raw = config.to_dict()
        default = RunConfig().to_dict()
        for name in SECTIONS:  # what differs from the defaults is what the caller chose
            given[name] = {k: v for k, v in raw[name].items() if v != default[name][k]}
    else:
        raw = {"model": dataclasses.asdict(model_preset(preset or "mini")), "data": {}, "train": {}}
        if preset:  # given, not the default
            given["model"].update({k: raw["model"][k] for k in PRESET_FIELDS})
        if config is not None:  # keys and types now; the rest once layered
            for name, section in typed_sections(read_yaml(Path(config)), str(config)).items():
                merge(raw[name], section)
                merge(given[name], section)
    for name, kind in SECTIONS.items():
        section = typed(kind, values[name], name)
        merge(raw[name], section)
        merge(given[name], section)
    cfg = RunConfig(**{name: build(kind, raw[name], name) for name, kind in SECTIONS.items()})
    return cfg, given


def evaluate(
    run_dir: PathLike,
    *,
    data: PathLike | Sequence[PathLike] | None = None,
    split: str = "valid",
    checkpoint: PathLike | None = None,
    max_sequences: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    out: PathLike | None = None,
) -> dict[str, Any]:
    """Held-out MLM loss, accuracy and perplexity of a run (`bertforge evaluate`), with the
    unigram baseline on the same masked tokens: of its newest good checkpoint (or
    `checkpoint`), on its data (or `data`). max_sequences (0: all) and precision default to
    the run's own, so the figures equal its logged evaluation. out: also write them to this
    file as JSON."""
    from bertforge.commands.evaluate import evaluate_run

    data_list = _list(data, "data") if data is not None else None
    if max_sequences is not None:
        _number("max_sequences", max_sequences, int)
    if precision is not None:
        _choice("precision", precision, PRECISIONS)
    check_paths(
        [
            ("run_dir", run_dir),
            *[("--data", d) for d in data_list or []],
            *([("--checkpoint", checkpoint)] if checkpoint else []),
        ],
        [Output("--out", out, "file")] if out else [],
    )
    result = evaluate_run(
        Path(run_dir),
        [Path(d) for d in data_list] if data_list else None,
        split,
        Path(checkpoint) if checkpoint else None,
        max_sequences,
        device,
        precision,
    )
    if out:
        write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    return result


def export(run_dir: PathLike, out: PathLike) -> Path:
    """Write the run's final weights and tokenizer as a Hugging Face model directory
    (`bertforge export`); returns it. transformers.BertForMaskedLM.from_pretrained reads it."""
    from bertforge.commands.loading import load_run_model
    from bertforge.hf import export_model

    require_utf8(out, "--out")  # the tokenizer library takes paths as text
    check_paths([("run_dir", run_dir)], [Output("--out", out, "export")])
    model, _, tok_dir = load_run_model(Path(run_dir))
    export_model(model, Path(out), tokenizer_dir=tok_dir)
    return Path(out)


def fill_mask(model: PathLike, text: str, *, top_k: int = 5) -> list[MaskFill]:
    """The `top_k` most likely tokens for each [MASK] of `text`, in order, from a run or a
    Hugging Face directory (`bertforge fill-mask`)."""
    from bertforge.commands.fill_mask import fill_mask as fill

    _number("top_k", top_k, int)
    return [
        MaskFill(
            r["mask_index"], r["position"], [(p["token"], p["score"]) for p in r["predictions"]]
        )
        for r in fill(Path(model), text, top_k)
    ]


def finetune(
    model: PathLike,
    out: PathLike,
    *,
    task: str | None = None,
    data_dir: PathLike | None = None,
    train: PathLike | None = None,
    validation: PathLike | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    regression: bool = False,
    from_scratch: bool = False,
    resume: bool = False,
    config: FinetuneConfig | None = None,
    quiet: bool = False,
    **options: Any,
) -> FinetuneResult:
    """Fine-tune `model` (a run or a Hugging Face BERT directory) for sequence
    classification or regression into `out` (`bertforge finetune`); the export goes to
    OUT/hf.

    The data is a GLUE `task` in `data_dir`, or your own `train` and `validation` files
    (CSV, TSV with a header row, or JSONL; the columns named by text_column,
    text_pair_column for sentence pairs, label_column; regression: numeric labels).
    from_scratch: the same architecture randomly initialised (the baseline). The settings
    are `config`, then `options`: any field of FinetuneConfig (epochs, max_length, ...) or
    of its TrainConfig (lr, batch_size, warmup_fraction, ...) by name. resume: continue the
    run in `out`; options given then must agree with its saved config.
    """
    from bertforge.commands.finetune import run_finetune

    check_paths(
        [
            (flag, v)
            for flag, v in (
                ("model", model),
                ("--data-dir", data_dir),
                ("--train", train),
                ("--validation", validation),
            )
            if v
        ],
        [Output("--out", out, "finetune")],
    )
    cfg, given = resolve_finetune_config(config, options)
    data = _task_data(
        task, data_dir, train, validation, text_column, text_pair_column, label_column, regression
    )
    summary = run_finetune(
        Path(model),
        data,
        Path(out),
        cfg,
        from_scratch=from_scratch,
        resume=resume,
        given=given,
        show_progress=not quiet,
    )
    return FinetuneResult(
        out_dir=Path(out),
        task=summary["task"],
        score=summary["score"],
        best_epoch=summary["best_epoch"],
        metrics=summary["best"],
        hf_dir=Path(summary["export"]),
        summary=summary,
    )


def resolve_finetune_config(
    config: FinetuneConfig | None, options: dict[str, Any]
) -> tuple[FinetuneConfig, dict[str, Any]]:
    """`config` (default: the fine-tuning defaults) with `options` over it, and the values
    the caller chose, by field name (what a resume checks)."""
    own = {f.name: FinetuneConfig for f in dataclasses.fields(FinetuneConfig) if f.name != "train"}
    trainable = {
        f.name: TrainConfig
        for f in dataclasses.fields(TrainConfig)
        if f.name not in NOT_FOR_FINETUNING
    }
    values = split_options(
        options, {"finetune": FinetuneConfig, "train": TrainConfig}, {**own, **trainable}
    )
    if config is None:
        raw: dict[str, Any] = {"train": {}}
        given: dict[str, Any] = {}
    else:
        raw = dataclasses.asdict(config)
        default = dataclasses.asdict(FinetuneConfig())
        given = {
            k: v
            for k, v in {**raw["train"], **raw}.items()
            if k != "train" and v != {**default["train"], **default}[k]
        }
    train = typed(TrainConfig, values["train"], "train")
    finetune = typed(FinetuneConfig, values["finetune"], "finetune")
    merge(given, {**train, **finetune})
    raw.update(finetune)
    cfg = FinetuneConfig(train=finetune_train_config(**merge(raw.pop("train"), train)), **raw)
    return cfg, given


def predict(
    model_dir: PathLike,
    texts: str | Sequence[str],
    pairs: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One {"label", "probabilities"} (classification) or {"score"} (regression) per text,
    in order, from a fine-tuned model (a `finetune` output directory or its hf/); an empty
    text gets a null prediction. pairs: the second texts, for sentence-pair tasks.
    max_length: truncate to N tokens (default: the fine-tuning run's)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if pairs is not None and len(pairs) != len(texts):
        raise BertforgeError(f"pairs: {len(pairs)} second texts for {len(texts)} texts")
    predictor = _predictor(model_dir, batch_size, max_length, device)
    return _predictions(predictor, texts, list(pairs) if pairs is not None else None, batch_size)


def predict_file(
    model_dir: PathLike,
    input: PathLike,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
    device: str = "cpu",
    with_text: bool = True,
    quiet: bool = False,
) -> Iterator[dict[str, Any]]:
    """The predictions for each input of a CSV, TSV or JSONL file, or a .txt file with one
    text a line ('-': stdin), in order: one record each, naming its input's line (and its
    text, with_text), then its prediction as `predict` gives it. Inputs are read and
    predicted a chunk at a time (bounded memory), with progress on stderr unless quiet;
    the model is loaded, and the file checked, before this returns."""
    from bertforge.data.labelled import iter_inputs

    check_paths([("model_dir", model_dir), ("--input", input)], [])
    predictor = _predictor(model_dir, batch_size, max_length, device)
    inputs = iter_inputs(Path(input), text_column, text_pair_column)

    def records() -> Iterator[dict[str, Any]]:
        done, start = 0, time.monotonic()
        while chunk := list(itertools.islice(inputs, max(PREDICT_CHUNK, batch_size))):
            pairs = [pair or "" for _, _, pair in chunk] if text_pair_column else None
            results = _predictions(predictor, [text for _, text, _ in chunk], pairs, batch_size)
            for (line, text, pair), result in zip(chunk, results):
                record: dict[str, Any] = {"line": line}
                if with_text:
                    record["text"] = text
                    if pair is not None:
                        record["text_pair"] = pair
                yield {**record, **result}
            done += len(chunk)
            if not quiet and done >= PREDICT_CHUNK:  # small inputs: no progress to show
                print(f"predict: {done:,} inputs, {time.monotonic() - start:.0f}s", file=sys.stderr)
        if done == 0:
            raise BertforgeError(f"{input}: no inputs")

    return records()


def glue(
    model: PathLike,
    data_dir: PathLike,
    *,
    tasks: Sequence[str] | None = None,
    out: PathLike | None = None,
    results: PathLike | None = None,
    from_scratch: bool = False,
    config: FinetuneConfig | None = None,
    quiet: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Fine-tune `model` on several GLUE tasks of `data_dir` (default: every task present)
    into OUT/<task>/ (default OUT: MODEL-glue), with the settings of `finetune`; returns
    each task's score and metrics and their average (`bertforge glue`). results: also
    write them to this file as JSON."""
    from bertforge.commands.glue import run_glue

    cfg, _ = resolve_finetune_config(config, options)
    out_dir = Path(out) if out else Path(str(Path(model)).rstrip("/") + "-glue")
    check_paths(
        [("model", model), ("--data-dir", data_dir)],
        [
            Output("--out", out_dir, "glue"),
            *([Output("--results", results, "file")] if results else []),
        ],
    )
    report = run_glue(
        Path(model),
        Path(data_dir),
        out_dir,
        list(tasks) if tasks else None,
        cfg,
        from_scratch=from_scratch,
        show_progress=not quiet,
    )
    if results:
        write_text_atomic(results, json.dumps(report, indent=1) + "\n")
    return report


def report(run_dir: PathLike, out: PathLike | None = None) -> Path:
    """Plots (PNG) and report.md of a run's metrics, in `out` (default: RUN_DIR/report);
    returns the folder (`bertforge report`; needs matplotlib)."""
    from bertforge import rundir
    from bertforge.commands.finetune import SPEC
    from bertforge.commands.report import REPORT, write_report

    # What it reads is the run's record, not the whole directory: its report goes inside.
    check_paths(
        [("run_dir", Path(run_dir) / name) for name in (rundir.METRICS, rundir.CONFIG, SPEC)],
        [Output("--out", out or Path(run_dir) / REPORT, "report", home=("run", "finetune"))],
    )
    return write_report(Path(run_dir), Path(out) if out else None)


# ------------------------------------------------------------------------------ helpers


def corpus_inputs(flag: str, corpus: list[str] | None) -> list[tuple[str, str]]:
    """A corpus as inputs for check_paths: each path given and each file it names."""
    from bertforge.data.corpus import resolve_corpus

    if not corpus:
        return []
    given = [(flag, c) for c in corpus if os.path.lexists(c)]
    return given + [(flag, str(p)) for p in resolve_corpus(corpus)]


def split_options(
    options: dict[str, Any], sections: dict[str, type], owners: dict[str, type] | None = None
) -> dict[str, dict[str, Any]]:
    """Keyword options by the config section whose field each names; an option no
    section has (or `owners` leaves out) is refused."""
    if owners is None:
        owners = {f.name: kind for kind in sections.values() for f in dataclasses.fields(kind)}
    by_kind = {kind: name for name, kind in sections.items()}
    out: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in options.items():
        if key not in owners:
            raise BertforgeError(f"unknown option {key!r}")
        out[by_kind[owners[key]]][key] = value
    return out


def _task_data(
    task: str | None,
    data_dir: PathLike | None,
    train: PathLike | None,
    validation: PathLike | None,
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
    regression: bool,
) -> Any:
    from bertforge.commands.glue import load_glue_task
    from bertforge.data.labelled import load_own_task

    if train or validation:
        if not (train and validation):
            raise BertforgeError("give both --train FILE and --validation FILE")
        data = load_own_task(
            Path(train), Path(validation), text_column, label_column, text_pair_column, regression
        )
        if task:
            data.name = task
        return data
    if not (task and data_dir):
        raise BertforgeError(
            "give --task NAME --data-dir DIR (a GLUE task) or --train FILE "
            "--validation FILE (your own data)"
        )
    if regression:
        raise BertforgeError(
            "--regression is for --train/--validation files; GLUE tasks know their kind"
        )
    return load_glue_task(task, Path(data_dir))


def _predictor(model_dir: PathLike, batch_size: int, max_length: int | None, device: str) -> Any:
    from bertforge.commands.finetune import Predictor

    _number("batch_size", batch_size, int)
    if max_length is not None:
        _field_number(FinetuneConfig, "max_length", max_length)
    return Predictor(Path(model_dir), max_length, device)


def _predictions(
    predictor: Any, texts: list[str], pairs: list[str] | None, batch_size: int
) -> list[dict[str, Any]]:
    """The predictor's for each text; an empty text's is null (every input has one)."""
    filled = [i for i, text in enumerate(texts) if text]
    results = [predictor.blank()] * len(texts)
    if filled:
        for i, r in zip(
            filled,
            predictor(
                [texts[i] for i in filled],
                [pairs[i] for i in filled] if pairs else None,
                batch_size,
            ),
        ):
            results[i] = r
    return results


def _corpus_options(text_field: str, text_column: str, one_doc_per_line: bool, dedup: bool) -> Any:
    from bertforge.data.corpus import CorpusOptions

    return CorpusOptions(
        text_field=text_field,
        text_column=text_column,
        one_doc_per_line=one_doc_per_line,
        dedup=dedup,
    )


def _list(value: PathLike | Sequence[PathLike], name: str) -> list[str]:
    """One path or several, as a list of strings."""
    paths = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    if not paths:
        raise BertforgeError(f"{name}: give at least one path")
    return [str(p) for p in paths]


def _number(name: str, value: Any, kind: type, rule: str | None = None) -> None:
    """Refuse `value` unless it is a `kind` that meets `rule` (RULES[name] by default)."""
    rule = rule or RULES[name]
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise BertforgeError(f"{name}: expected {kind.__name__}, got {value!r}")
    if not satisfies(value, rule):
        raise BertforgeError(f"{name}={value!r}: {rule_text(rule)}")


def _field_number(kind: type, name: str, value: Any) -> None:
    """`_number` by the rule of field `name` of config dataclass `kind`."""
    f = next(f for f in dataclasses.fields(kind) if f.name == name)
    _number(name, value, typing.get_type_hints(kind)[name], f.metadata["rule"])


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise BertforgeError(f"{name}={value!r}: must be one of {', '.join(choices)}")
