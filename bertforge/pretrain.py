"""Masked-LM pretraining: the MLM task for the training loop, and the run orchestration.

`run_pretrain` turns a corpus (or prepared data) into a trained, evaluated and exported
model in one call, caching the tokenizer and token shards in the run directory so that
a second call, or a resume, skips them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bertforge import rundir
from bertforge.checkpoint import load_model_weights
from bertforge.config import ModelConfig, RunConfig, TrainConfig
from bertforge.data.corpus import CorpusOptions
from bertforge.data.loader import PretrainBatches, ShardedSequences, as_dirs
from bertforge.data.masking import MaskedBatch, build_masker
from bertforge.data.pairs import PairBuilder, PairedMasker, pair_kind
from bertforge.data.tokenizer import copy_tokenizer, load_tokenizer, special_token_ids
from bertforge.distributed import Distributed
from bertforge.errors import BertforgeError
from bertforge.evaluate import heldout_metrics
from bertforge.model import BertForPreTraining
from bertforge.ops import cross_entropy_and_hits
from bertforge.runtime import configure, resolve_device, resolve_precision
from bertforge.step import StepBatch
from bertforge.train import fit

# Train-config fields a resume may change; everything else is forced from config.yaml.
# max_steps and time_budget only where the schedule does not depend on them
# (`check_schedule_change`).
RESUMABLE_OVERRIDES = {("train", k) for k in ("max_steps", "time_budget", "eval_every",
                                              "checkpoint_every", "log_every", "keep_last",
                                              "device", "on_nan", "strategy", "compile",
                                              "num_workers", "tensorboard", "wandb")} \
    | {("data", "path")}


class MLMTask:
    """Masked-LM over prepared shards: sparse prediction at the masked positions only.

    With `data.objective` mlm+nsp or mlm+sop, each training sequence is first made into a
    sentence pair (bertforge.data.pairs) and the 2-way head is trained too: two loss terms,
    MLM normalised by the masked tokens and NSP/SOP by the pairs of the global batch.
    Held-out metrics are computed in `dtype`, as `bertforge evaluate` computes them.
    """

    def __init__(self, cfg: RunConfig, data_dir: Path | list[Path], device: torch.device,
                 rank: int = 0, world_size: int = 1, dtype: torch.dtype | None = None):
        train = ShardedSequences(data_dir, "train")
        manifest = train.manifest
        first = train.data_dirs[0]  # of one or several; they share the tokenizer
        self.masker = build_masker(cfg.data, first, manifest)
        # Held-out scoring always uses token masking, whatever the training variant.
        self.eval_masker = build_masker(cfg.data, first, manifest, for_eval=True)
        t = cfg.train
        self.objective = cfg.data.objective
        self.pair_kind = pair_kind(cfg.data.objective)  # 'nsp', 'sop' or None (plain MLM)
        batch_masker = self.masker if self.pair_kind is None else PairedMasker(
            self.masker, PairBuilder(train, manifest["special_token_ids"], self.pair_kind))
        self.batches = PretrainBatches(train, batch_masker, t.batch_size, t.micro_batch_size,
                                       t.seed, rank, world_size)
        self.valid = ShardedSequences(data_dir, "valid")
        self.device, self.dtype = device, dtype
        self.eval_sequences = t.eval_sequences

    def batch(self, step: int) -> StepBatch:
        """This rank's micro-batches of step `step`, masked, with their counts: masked
        tokens ("mlm") and, with NSP/SOP, labelled pairs (-100: no pair could be made)."""
        micro = list(self.batches.micro_batches(step))
        counts = {"mlm": sum(m.targets.numel() for m in micro)}
        if self.pair_kind is not None:
            counts[self.pair_kind] = sum(int((m.next_sentence_label >= 0).sum()) for m in micro)
        return StepBatch(micro, counts, sum(m.real_tokens for m in micro))

    def loss_sum(self, model: torch.nn.Module, micro: MaskedBatch
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return mlm_loss_sum(model, micro, self.pair_kind)

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        if len(self.valid) == 0:
            return {}
        return heldout_metrics(model, self.valid, self.eval_masker, self.objective,
                               self.device, self.dtype, self.eval_sequences)

    def epoch_at(self, step: int) -> float:
        return self.batches.epoch_at(step)


def pretraining_model(config: ModelConfig, objective: str) -> BertForPreTraining:
    """A freshly initialised BertForPreTraining for `objective`. Under plain MLM the pooler
    and NSP head get no gradient; they are frozen, so DDP and FSDP need not wait for one
    (and AdamW would skip them anyway)."""
    model = BertForPreTraining(config)
    if objective == "mlm":
        for module in (model.bert.pooler, model.seq_relationship):
            module.requires_grad_(False)
    return model


def mlm_loss_sum(model: torch.nn.Module, micro: MaskedBatch, pair_kind: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The summed MLM loss of a micro-batch (and NSP/SOP's, for `pair_kind`), with the
    summed accuracies; everything stays on the device."""
    logits, pair_logits = model(micro.input_ids, token_type_ids=micro.token_type_ids,
                                attention_mask=micro.attention_mask,
                                masked_positions=micro.masked_positions)  # (N, V), (B, 2)
    loss, hits = cross_entropy_and_hits(logits, micro.targets)
    losses, metrics = {"mlm": loss}, {"mlm_accuracy": hits}
    if pair_kind is not None:
        labels = micro.next_sentence_label  # (B,)
        # Summed in fp32; labels of -100 add nothing to the loss and never match an argmax.
        losses[pair_kind] = F.cross_entropy(pair_logits.float(), labels, reduction="sum")
        metrics[f"{pair_kind}_accuracy"] = (pair_logits.detach().argmax(-1) == labels).sum()
    return losses, metrics


def build_data(run_dir: Path, corpus: list[str], vocab_size: int, lowercase: bool,
               cfg: RunConfig, show_progress: bool, corpus_options: CorpusOptions | None = None,
               sample_bytes: int | None = None) -> Path:
    """Tokenizer and shards inside RUN_DIR, each built only if not already there.

    Both read the corpus with `corpus_options` (a CorpusOptions); the tokenizer trains on
    about `sample_bytes` of it when given.
    """
    from bertforge.data.corpus import resolve_corpus
    from bertforge.data.prepare import prepare
    from bertforge.data.tokenizer import train_tokenizer

    files = [str(p) for p in resolve_corpus(corpus)]
    tok_dir, data_dir = run_dir / rundir.TOKENIZER, run_dir / rundir.DATA
    if not (tok_dir / "tokenizer.json").is_file():
        t0 = time.monotonic()
        train_tokenizer(files, tok_dir, vocab_size=vocab_size, lowercase=lowercase,
                        show_progress=show_progress, options=corpus_options,
                        sample_bytes=sample_bytes)
        print(f"tokenizer: trained in {time.monotonic() - t0:.1f}s -> {tok_dir}", file=sys.stderr)
    if not (data_dir / "manifest.json").is_file():
        t0 = time.monotonic()
        prepare(files, tok_dir, data_dir, seq_len=cfg.data.seq_len,
                valid_fraction=cfg.data.valid_fraction, show_progress=show_progress,
                corpus_options=corpus_options,
                document_boundary=cfg.data.document_boundary)
        print(f"prepare: done in {time.monotonic() - t0:.1f}s -> {data_dir}", file=sys.stderr)
    return data_dir


def check_data(data_dir: Path | list[Path], cfg: RunConfig,
               run_dir: Path | None = None) -> dict[str, Any]:
    """The manifest of the data directory (the first of several, which must agree with
    each other), refused if it does not fit the run's config; with `run_dir` (a resume),
    also if it was made with another tokenizer than the run's."""
    from bertforge.data.loader import as_dirs, load_manifests
    from bertforge.data.tokenizer import tokenizer_hash

    check_lengths(cfg)
    expected = cfg.data.tokenizer_hash
    if run_dir is not None and expected is None and (run_dir / rundir.TOKENIZER).is_dir():
        expected = tokenizer_hash(run_dir / rundir.TOKENIZER)  # a run that recorded none
    dirs = as_dirs(data_dir)
    manifests = load_manifests(dirs)
    for data_dir, manifest in zip(dirs, manifests):
        if int(manifest["seq_len"]) != cfg.data.seq_len:
            raise BertforgeError(f"data.seq_len: {data_dir} was prepared with seq_len "
                                 f"{manifest['seq_len']}, but the run has seq_len "
                                 f"{cfg.data.seq_len}")
        boundary = manifest.get("document_boundary", "cross")  # older data: always cross
        if boundary != cfg.data.document_boundary:
            raise BertforgeError(f"data.document_boundary: {data_dir} was prepared with "
                                 f"{boundary!r}, but the run has "
                                 f"{cfg.data.document_boundary!r} (--document-boundary)")
        found = manifest.get("tokenizer_hash") or tokenizer_hash(Path(data_dir) / "tokenizer")
        if expected and found != expected:
            hint = (f" ({cfg.train.init}'s); prepare the data with --tokenizer "
                    f"{cfg.train.init}" if cfg.train.init else "")
            raise BertforgeError(f"data.tokenizer_hash: {data_dir} was made with tokenizer "
                                 f"{found}, but the run uses tokenizer {expected}{hint}")
        vocab = int(manifest["vocab_size"])
        # A model's embedding table may have rows past its tokenizer's (padded vocabularies).
        if run_dir is not None and (vocab > cfg.model.vocab_size if cfg.train.init
                                    else vocab != cfg.model.vocab_size):
            raise BertforgeError(f"model.vocab_size: {data_dir} has a vocabulary of "
                                 f"{vocab}, but the run has {cfg.model.vocab_size}")
        manifest["tokenizer_hash"] = expected = found  # the next must match this one
    return manifests[0]


def check_lengths(cfg: RunConfig) -> None:
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise BertforgeError(f"data.seq_len {cfg.data.seq_len} exceeds "
                             f"model.max_position_embeddings {cfg.model.max_position_embeddings}")


def resolve_resume(run_dir: Path, cfg: RunConfig, given: dict[str, dict[str, Any]]) -> RunConfig:
    """The saved config, with only the schedule fields the user re-gave changed.

    Any other field given with a different value is refused, naming the field.
    """
    saved = RunConfig.load(run_dir / rundir.CONFIG)
    for section, values in given.items():
        for key, value in values.items():
            if (section, key) == ("model", "vocab_size"):  # fixed by the tokenizer already built
                continue
            old = getattr(getattr(saved, section), key)
            if old == value:
                continue
            if (section, key) not in RESUMABLE_OVERRIDES:
                raise BertforgeError(f"--resume: {section}.{key} was {old!r} in this run, "
                                     f"cannot change it to {value!r}")
            if key in ("max_steps", "time_budget"):
                check_schedule_change(saved.train, key, old, value)
            setattr(getattr(saved, section), key, value)
    return saved


def check_schedule_change(train: TrainConfig, key: str, old: Any, new: Any) -> None:
    """A resume may change the run's length only where the learning rate of every step
    stays what it was: a constant schedule with its warmup in steps. Otherwise the decay
    to zero (or a warmup that is a fraction of the run) would be re-shaped mid-run, the
    learning rate would jump, and the run would no longer be the one its config says."""
    if train.schedule_depends_on_length:
        why = (f"its {train.schedule} schedule decays to zero at the end of the run"
               if train.schedule != "constant" else
               f"its warmup is a fraction ({train.warmup_fraction}) of the run")
        raise BertforgeError(f"--resume: train.{key} was {old!r} in this run, cannot change "
                             f"it to {new!r}: {why}, so the learning rate of the steps to "
                             f"come would change; only runs with --schedule constant and "
                             f"--warmup-steps can be lengthened")


def run_pretrain(run_dir: Path, cfg: RunConfig, *, data_dir: Path | list[Path] | None = None,
                 corpus: list[str] | None = None, resume: bool = False,
                 lowercase: bool = True, given: dict[str, dict[str, Any]] | None = None,
                 show_progress: bool = True, corpus_options: CorpusOptions | None = None,
                 sample_bytes: int | None = None,
                 tokenizer: Path | None = None) -> dict[str, Any]:
    """Pretrain into `run_dir`; returns the final metrics.

    With `corpus`, the tokenizer is `tokenizer` (a tokenizer or model directory), or with
    cfg.train.init the model's, or else trained on the corpus. Under torchrun every rank
    calls this: rank 0 prepares the run directory (config, data, tokenizer) while the
    others wait, then all train; rank 0 alone writes.
    """
    from bertforge.distributed import init_from_env, launched, shutdown
    from bertforge.tracking import check_available

    check_available(cfg.train)  # a missing tracker package, before any work
    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
    if launched() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    dist = init_from_env(cfg.train.strategy, device)
    if dist.is_main:
        try:
            data_dir = _prepare_run(run_dir, cfg, data_dir, corpus, resume, lowercase, given,
                                    show_progress, corpus_options, sample_bytes, tokenizer)
        finally:
            dist.barrier()  # on an error too: the others then fail on the missing config
    else:
        dist.barrier()
        if not (run_dir / rundir.CONFIG).is_file():
            raise BertforgeError(f"rank {dist.rank}: rank 0 could not prepare the run "
                                 f"(its error says why)")
        cfg = RunConfig.load(run_dir / rundir.CONFIG)
        data_dir = as_dirs(cfg.data.path)
    try:
        return _train(run_dir, cfg, data_dir, device, dist, resume,
                      show_progress and dist.is_main)
    finally:
        shutdown()


def _prepare_run(run_dir: Path, cfg: RunConfig, data_dir: Path | list[Path] | None,
                 corpus: list[str] | None, resume: bool, lowercase: bool,
                 given: dict[str, dict[str, Any]] | None, show_progress: bool,
                 corpus_options: CorpusOptions | None = None,
                 sample_bytes: int | None = None,
                 tokenizer: Path | None = None) -> list[Path]:
    """Resolve the config (forced from config.yaml on resume), build or check the data,
    copy the tokenizer and save the config; returns the data directories. `cfg` is updated
    in place."""
    source = None  # a tokenizer to use, not to train: --tokenizer's, or --init's model's
    if resume:
        rundir.require_run_dir(run_dir)
        saved = resolve_resume(run_dir, cfg, given or {})
        for section in ("model", "data", "train"):
            setattr(cfg, section, getattr(saved, section))
    elif (run_dir / rundir.CHECKPOINTS).exists():
        raise BertforgeError(f"{run_dir} already holds a run; pass --resume to continue it "
                             f"or choose another --out")
    elif cfg.train.init:
        if tokenizer is not None:
            raise BertforgeError("give --init or --tokenizer, not both: --init brings the "
                                 "model's own tokenizer")
        source = apply_init(cfg, (given or {}).get("model", {}))
    if tokenizer is not None and not resume:
        source = Path(tokenizer)
    check_lengths(cfg)  # before any work: building the data can take a while
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = run_dir / rundir.TOKENIZER
    if source is not None and not tok_dir.exists():
        copy_tokenizer(source, tok_dir)
    if source is not None and not cfg.train.init:  # the vocabulary is the given tokenizer's
        tok = load_tokenizer(tok_dir)
        cfg.model.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        cfg.model.pad_token_id = special_token_ids(tok)["pad"]
    if corpus:
        data_dir = build_data(run_dir, corpus, cfg.model.vocab_size, lowercase, cfg,
                              show_progress, corpus_options, sample_bytes)
    elif data_dir is None:
        data_dir = cfg.data.path or run_dir / rundir.DATA  # one directory or a list
    dirs = [d.resolve() for d in as_dirs(data_dir)]
    cfg.data.path = str(dirs[0]) if len(dirs) == 1 else [str(d) for d in dirs]
    manifest = check_data(dirs, cfg, run_dir if resume or source is not None else None)
    if not tok_dir.exists():  # copied whole or not at all
        copy_tokenizer(dirs[0] / "tokenizer", tok_dir)  # the directories share it
    if not cfg.train.init:  # an initialised run keeps its model's vocabulary and ids
        cfg.model.vocab_size = int(manifest["vocab_size"])
        cfg.model.pad_token_id = int(manifest["special_token_ids"]["pad"])
    cfg.data.tokenizer_hash = manifest["tokenizer_hash"]  # checked on every resume
    cfg.save(run_dir / rundir.CONFIG)
    return dirs


# ModelConfig fields that make the architecture: a run started from a model keeps them.
ARCHITECTURE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
                "layer_norm_eps")


def apply_init(cfg: RunConfig, given_model: dict[str, Any]) -> Path:
    """Make cfg.model the architecture of cfg.train.init's model (the dropout and other
    values the user gave stay); refuse a given architecture field that contradicts it.
    Returns the directory of the model's tokenizer."""
    init = Path(cfg.train.init).expanduser()
    model, tokenizer = rundir.init_source(init)
    for key in ARCHITECTURE:
        if key in given_model and given_model[key] != getattr(model, key):
            raise BertforgeError(f"--init: model.{key} is {getattr(model, key)!r} in {init}, "
                                 f"but the flags or --config say {given_model[key]!r}; a "
                                 f"continued run keeps its model's architecture")
    cfg.model = dataclasses.replace(model, **{k: v for k, v in given_model.items()
                                              if k not in ARCHITECTURE})
    cfg.train.init = str(init.resolve())
    return tokenizer


def load_init(model: torch.nn.Module, init: str, is_main: bool) -> None:
    """Load `init`'s weights into `model` (a fresh BertForPreTraining); what the source has
    no weights for keeps its fresh initialisation, and the run says so."""
    weights, missing = rundir.init_weights(Path(init))
    _, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise BertforgeError(f"--init {init}: weights the model has no place for: "
                             f"{', '.join(unexpected[:3])}")
    if is_main:
        parts = {"mlm.": "the MLM head", "seq_relationship.": "the NSP head",
                 "bert.pooler.": "the pooler"}
        fresh = sorted({name for prefix, name in parts.items()
                        if any(k.startswith(prefix) for k in missing)})
        print(f"pretrain: weights from {init}"
              + (f"; it has none for {' and '.join(fresh)}, initialised fresh" if fresh else ""),
              file=sys.stderr)


def _train(run_dir: Path, cfg: RunConfig, data_dir: list[Path], device: torch.device,
           dist: Distributed, resume: bool, show_progress: bool) -> dict[str, Any]:
    from bertforge.hf import export_model

    where = configure(device)
    dtype = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = pretraining_model(cfg.model, cfg.data.objective)
    if cfg.train.init:  # before a resume's checkpoint, which fit loads over it
        load_init(model, cfg.train.init, dist.is_main)
    model.to(device)
    task = MLMTask(cfg, data_dir, device, dist.rank, dist.world_size, dtype)
    if dist.is_main:
        procs = (f", {dist.world_size} processes ({dist.strategy})" if dist.enabled else "")
        print(f"pretrain: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{len(task.batches.sequences):,} training sequences of {cfg.data.seq_len} "
              f"tokens, batch {cfg.train.batch_size} (micro {cfg.train.micro_batch_size}), "
              f"{where}, {'bf16' if dtype else 'fp32'}{procs}",
              file=sys.stderr)
    result = fit(model, task, cfg.train, run_dir, device, dtype, resume=resume, name="pretrain",
                 show_progress=show_progress, dist=dist, run_config=cfg.to_dict())
    weights = dist.model_state(model)  # gathered from the shards under FSDP
    if dist.is_main:
        final = BertForPreTraining(cfg.model)
        load_model_weights(final, weights)
        export_model(final, run_dir / rundir.HF, tokenizer_dir=run_dir / rundir.TOKENIZER)
        write_run_report(run_dir)
    dist.barrier()
    return result


def write_run_report(run_dir: Path) -> None:
    """Plots and report.md in RUN_DIR/report; a missing matplotlib only warns."""
    from bertforge.report import write_report

    try:
        out = write_report(run_dir)
    except BertforgeError as e:
        print(f"report: skipped ({e})", file=sys.stderr)
    else:
        print(f"report: {out}", file=sys.stderr)
