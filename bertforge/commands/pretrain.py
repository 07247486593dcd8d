"""`bertforge pretrain`: masked-LM pretraining of a BERT, from a corpus or prepared data.

`run_pretrain` reads top to bottom: set up the run directory (config resolved once by
bertforge.commands.resolve, tokenizer and shards from the `--corpus` cache in
bertforge.data.cache), fit the MLM task (bertforge.tasks.mlm) with the one training loop,
then export the model to Hugging Face format and write the run's report. Under torchrun
every rank calls it; rank 0 alone prepares the run directory and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bertforge import paths, rundir
from bertforge.commands.loading import init_source, load_init_weights
from bertforge.commands.resolve import Given, resolve_data, resolve_start
from bertforge.config import DEFAULT_MICRO_BATCH, RunConfig
from bertforge.data.cache import BUILT_FROM, build_data
from bertforge.data.corpus import CorpusOptions, CorpusStats, iter_documents, resolve_corpus
from bertforge.data.loader import DataDirs, as_dirs
from bertforge.data.tokenizer import copy_tokenizer, tokenizer_hash
from bertforge.errors import BertforgeError
from bertforge.fileio import hold_lock, require_utf8
from bertforge.model.bert import BertForPreTraining
from bertforge.paths import Undo, make_marked
from bertforge.tasks.mlm import MLMTask, pretraining_model
from bertforge.train.checkpoint import any_checkpoint, gather_model_state, remove_partial
from bertforge.train.consistency import check_training_fits
from bertforge.train.distributed import Distributed
from bertforge.train.loop import fit
from bertforge.train.runtime import (
    configure,
    default_micro_batch,
    resolve_device,
    resolve_precision,
    training_memory,
)
from bertforge.weights import load_model_weights

# What a start writes in RUN_DIR before training; a failed start removes those it made.
RUN_FILES = (paths.MARKER, rundir.CONFIG, rundir.TOKENIZER, rundir.DATA, BUILT_FROM)


def run_pretrain(
    run_dir: Path,
    cfg: RunConfig,
    *,
    data_dir: Path | list[Path] | None = None,
    corpus: list[str] | None = None,
    resume: bool = False,
    lowercase: bool = True,
    given: dict[str, dict[str, Any]] | None = None,
    show_progress: bool = True,
    corpus_options: CorpusOptions | None = None,
    sample_bytes: int | None = None,
    tokenizer: Path | None = None,
) -> dict[str, Any]:
    """Pretrain into `run_dir`; returns the final metrics.

    With `corpus`, the tokenizer is `tokenizer` (a tokenizer or model directory), or with
    cfg.train.init the model's, or else trained on the corpus. Under torchrun every rank
    calls this: rank 0 prepares the run directory (config, data, tokenizer) while the
    others wait, then all train; rank 0 alone writes.
    """
    from bertforge.train.distributed import init_from_env, launched, shutdown
    from bertforge.train.tracking import check_available

    check_available(cfg.train)  # a missing tracker package, before any work
    run_dir = Path(run_dir)
    require_utf8(run_dir, "--out")  # else the run fails at its end, exporting the tokenizer
    device = resolve_device(cfg.train.device)
    if launched() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dist = init_from_env(cfg.train.strategy, device)
    # Rank 0 writes the run directory and holds its lock to the end: a second command on
    # the same run is refused, naming this one, instead of interleaving with it.
    with (
        hold_lock(run_dir / rundir.LOCK, f"run directory {run_dir}")
        if dist.is_main
        else contextlib.nullcontext()
    ):
        # A start that fails before training removes what it made in RUN_DIR, only that
        # (the lock then removes the directories it made).
        undo = Undo(run_dir, RUN_FILES if dist.is_main else ())
        with undo:
            if dist.is_main:
                if resume:  # a kill mid-save left them (the lock says no one is writing one)
                    remove_partial(run_dir / rundir.CHECKPOINTS)
                try:
                    cfg = _prepare_run(
                        run_dir,
                        cfg,
                        data_dir,
                        corpus,
                        resume,
                        lowercase,
                        given or {},
                        show_progress,
                        corpus_options,
                        sample_bytes,
                        tokenizer,
                    )
                finally:
                    # On an error too: the others then fail on the missing config.
                    dist.wait_for_main()
            else:
                dist.wait_for_main()
                if not (run_dir / rundir.CONFIG).is_file():
                    raise BertforgeError(
                        f"rank {dist.rank}: rank 0 could not prepare the run (its error says why)"
                    )
                cfg = RunConfig.load(run_dir / rundir.CONFIG)
            try:
                return _train(
                    run_dir,
                    cfg,
                    device,
                    dist,
                    resume,
                    show_progress and dist.is_main,
                    started=undo.done,
                )
            finally:
                shutdown()


def _prepare_run(
    run_dir: Path,
    cfg: RunConfig,
    data_dir: Path | list[Path] | None,
    corpus: list[str] | None,
    resume: bool,
    lowercase: bool,
    given: Given,
    show_progress: bool,
    corpus_options: CorpusOptions | None = None,
    sample_bytes: int | None = None,
    tokenizer: Path | None = None,
) -> RunConfig:
    """The run's config, resolved (forced from config.yaml on resume), with its data built
    or checked and its tokenizer in RUN_DIR; saved as RUN_DIR/config.yaml."""
    cfg, source = resolve_start(run_dir, cfg, given, resume=resume, tokenizer=tokenizer)
    # Refused before RUN_DIR is made, so that a failed start leaves nothing behind: a
    # missing corpus file, a glob that matches nothing, a corpus without a document (its
    # first document is read, no more), no length of run.
    if corpus:
        stats = CorpusStats()
        if next(iter_documents(resolve_corpus(corpus), stats, corpus_options), None) is None:
            found = f" ({stats.problems()})" if stats.problems() else ""
            raise BertforgeError(f"corpus has no documents: {' '.join(corpus)}{found}")
    if not cfg.train.max_steps and not cfg.train.time_budget:
        raise BertforgeError("give --max-steps or --time-budget (how long to train)")
    make_marked(run_dir, "run")
    tok_dir = run_dir / rundir.TOKENIZER
    if source is not None and not tok_dir.exists():
        copy_tokenizer(source, tok_dir)
    data: DataDirs
    if corpus:
        # A resume's cached tokenizer is a copy of --tokenizer's or of its --init model's.
        cached_from = (
            source
            or (Path(tokenizer) if tokenizer is not None else None)
            or (init_source(Path(cfg.train.init))[1] if cfg.train.init else None)
        )
        data = build_data(
            run_dir,
            corpus,
            cfg.data,
            has_checkpoint=any_checkpoint(run_dir / rundir.CHECKPOINTS),
            vocab_size=given.get("model", {}).get("vocab_size", cfg.model.vocab_size),
            lowercase=lowercase,
            tokenizer=cached_from,
            corpus_options=corpus_options,
            sample_bytes=sample_bytes,
            show_progress=show_progress,
        )
    else:
        data = data_dir or cfg.data.path or run_dir / rundir.DATA  # one directory or a list
    # The tokenizer the data must have been made with: the run's own (on resume), or the
    # one it was given; a run that trained its own takes the data's.
    known = (
        cfg.data.tokenizer_hash
        if resume
        else tokenizer_hash(tok_dir)
        if source is not None
        else None
    )
    cfg = resolve_data(
        cfg, data, given, tokenizer_hash=known, fixed_vocab=resume or bool(cfg.train.init)
    )
    if not tok_dir.exists():  # copied whole or not at all
        copy_tokenizer(as_dirs(data)[0] / "tokenizer", tok_dir)  # the directories share it
    cfg.save(run_dir / rundir.CONFIG)
    return cfg


def load_init(model: torch.nn.Module, init: str, is_main: bool) -> None:
    """Load `init`'s weights into `model` (a fresh BertForPreTraining); what the source has
    no weights for keeps its fresh initialisation, and the run says so."""
    weights, missing = load_init_weights(Path(init))
    _, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise BertforgeError(
            f"--init {init}: weights the model has no place for: {', '.join(unexpected[:3])}"
        )
    if is_main:
        parts = {
            "mlm.": "the MLM head",
            "seq_relationship.": "the NSP head",
            "bert.pooler.": "the pooler",
        }
        fresh = sorted(
            {name for prefix, name in parts.items() if any(k.startswith(prefix) for k in missing)}
        )
        print(
            f"pretrain: weights from {init}"
            + (f"; it has none for {' and '.join(fresh)}, initialised fresh" if fresh else ""),
            file=sys.stderr,
        )


def _train(
    run_dir: Path,
    cfg: RunConfig,
    device: torch.device,
    dist: Distributed,
    resume: bool,
    show_progress: bool,
    started: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    from bertforge.hf import export_model

    where = configure(device)
    dtype = resolve_precision(cfg.train.precision, device)
    # Unset, the micro-batch is chosen below to fit a GPU (so at least one sequence must).
    micro = cfg.train.micro_batch_size or (1 if device.type == "cuda" else DEFAULT_MICRO_BATCH)
    check_training_fits(cfg.model, min(micro, cfg.train.batch_size), cfg.data.seq_len, device)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = pretraining_model(cfg.model, cfg.data.objective)
    if cfg.train.init:  # before a resume's checkpoint, which fit loads over it
        load_init(model, cfg.train.init, dist.is_main)
    model.to(device)
    if cfg.train.micro_batch_size is None:  # resolved per run: a resume may be elsewhere
        micro = micro_batch_for(cfg, model, device, dist.world_size)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro))
    data_dirs = as_dirs(cfg.data.path or run_dir / rundir.DATA)
    task = MLMTask(cfg, data_dirs, device, dist.rank, dist.world_size, dtype)
    if dist.is_main:
        procs = f", {dist.world_size} processes ({dist.strategy})" if dist.enabled else ""
        print(
            f"pretrain: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
            f"{len(task.batches.sequences):,} training sequences of {cfg.data.seq_len} "
            f"tokens, batch {cfg.train.batch_size} "
            f"(micro {cfg.train.micro_batch_size}), "
            f"{where}, {'bf16' if dtype else 'fp32'}{procs}",
            file=sys.stderr,
        )
    started()  # from here the run directory holds a run, failed or not
    result = fit(
        model,
        task,
        cfg.train,
        run_dir,
        device,
        dtype,
        resume=resume,
        name="pretrain",
        show_progress=show_progress,
        dist=dist,
        run_config=cfg.to_dict(),
    )
    weights = gather_model_state(model, dist)  # gathered from the shards under FSDP
    if dist.is_main:
        final = BertForPreTraining(cfg.model)
        load_model_weights(final, weights)
        export_model(final, run_dir / rundir.HF, tokenizer_dir=run_dir / rundir.TOKENIZER)
        write_run_report(run_dir)
    dist.barrier()
    return result


def micro_batch_for(
    cfg: RunConfig, model: torch.nn.Module, device: torch.device, world_size: int
) -> int:
    """The default micro-batch: the whole per-rank batch on a GPU where it fits in
    memory (estimated), else DEFAULT_MICRO_BATCH (bertforge.train.runtime)."""
    m, per_rank = cfg.model, max(cfg.train.batch_size // world_size, 1)
    fixed, per_sequence = training_memory(
        sum(p.numel() for p in model.parameters()),
        m.num_hidden_layers,
        m.hidden_size,
        m.num_attention_heads,
        cfg.data.seq_len,
        m.vocab_size,
        math.ceil(cfg.data.mask_rate * cfg.data.seq_len),
    )
    return default_micro_batch(device, per_rank, fixed, per_sequence, DEFAULT_MICRO_BATCH)


def write_run_report(run_dir: Path) -> None:
    """Plots and report.md in RUN_DIR/report; a missing matplotlib only warns."""
    from bertforge.commands.report import write_report

    try:
        out = write_report(run_dir)
    except BertforgeError as e:
        print(f"report: skipped ({e})", file=sys.stderr)
    else:
        print(f"report: {out}", file=sys.stderr)
