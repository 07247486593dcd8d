"""Masked-LM pretraining: the MLM task for the training loop, and the run orchestration.

`run_pretrain` turns a corpus (or prepared data) into a trained, evaluated and exported
model in one call, caching the tokenizer and token shards in the run directory so that
a second call, or a resume, skips them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bertforge import paths, rundir
from bertforge.train.checkpoint import gather_model_state, load_model_weights, remove_partial
from bertforge.config import DEFAULT_MICRO_BATCH, ModelConfig, RunConfig, TrainConfig
from bertforge.train.consistency import check_training_fits
from bertforge.data.corpus import CorpusOptions, CorpusStats, iter_documents, resolve_corpus
from bertforge.data.loader import PretrainBatches, ShardedSequences, as_dirs
from bertforge.data.masking import MaskedBatch, build_masker
from bertforge.data.pairs import PairBuilder, PairedMasker, pair_kind
from bertforge.data.readers import quote
from bertforge.data.tokenizer import copy_tokenizer, load_tokenizer, special_token_ids
from bertforge.train.distributed import Distributed
from bertforge.errors import BertforgeError
from bertforge.commands.evaluate import heldout_metrics
from bertforge.fileio import hold_lock, require_utf8, write_text_atomic
from bertforge.model.bert import BertForPreTraining
from bertforge.paths import Undo, make_marked, replace_owned, require_owned
from bertforge.model.ops import cross_entropy_and_hits
from bertforge.train.runtime import (
    configure,
    default_micro_batch,
    resolve_device,
    resolve_precision,
    training_memory,
)
from bertforge.train.step import StepBatch
from bertforge.train.loop import fit

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
        self.vocab_size = cfg.model.vocab_size

    def batch(self, step: int) -> StepBatch:
        """This rank's micro-batches of step `step`, masked, with their counts: masked
        tokens ("mlm") and, with NSP/SOP, labelled pairs (-100: no pair could be made)."""
        micro = list(self.batches.micro_batches(step))
        counts = {"mlm": sum(m.targets.numel() for m in micro)}
        if self.pair_kind is not None:
            counts[self.pair_kind] = sum(int((m.next_sentence_label >= 0).sum()) for m in micro)
        return StepBatch(micro, counts, sum(m.real_tokens for m in micro), MLM_METRIC_COUNTS)

    def loss_sum(self, model: torch.nn.Module, micro: MaskedBatch
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return mlm_loss_sum(model, micro, self.pair_kind, self.vocab_size)

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


# What each metric of `mlm_loss_sum` is an average over: the masked tokens, or the pairs.
MLM_METRIC_COUNTS = {"mlm_accuracy": "mlm", "nsp_accuracy": "nsp", "sop_accuracy": "sop"}


def mlm_loss_sum(model: torch.nn.Module, micro: MaskedBatch, pair_kind: str | None = None,
                 vocab_size: int | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The summed MLM loss of a micro-batch (and NSP/SOP's, for `pair_kind`), with the
    summed accuracies; everything stays on the device. Given the model's `vocab_size`,
    the decoder's output stays on the padded vocabulary (see model.MaskedLMHead)."""
    logits, pair_logits = model(micro.input_ids, token_type_ids=micro.token_type_ids,
                                attention_mask=micro.attention_mask,
                                masked_positions=micro.masked_positions,
                                padded_vocab=vocab_size is not None,
                                next_sentence=pair_kind is not None)  # (N, Vp), (B, 2)
    loss, hits = cross_entropy_and_hits(logits, micro.targets, vocab_size)
    losses, metrics = {"mlm": loss}, {"mlm_accuracy": hits}
    if pair_kind is not None:
        labels = micro.next_sentence_label  # (B,)
        # Summed in fp32; labels of -100 add nothing to the loss and never match an argmax.
        losses[pair_kind] = F.cross_entropy(pair_logits.float(), labels, reduction="sum")
        metrics[f"{pair_kind}_accuracy"] = (pair_logits.detach().argmax(-1) == labels).sum()
    return losses, metrics


# What a start writes in RUN_DIR before training; a failed start removes those it made.
RUN_FILES = (paths.MARKER, rundir.CONFIG, rundir.TOKENIZER, rundir.DATA, "built_from.json")

# What RUN_DIR's cached tokenizer and data were built from (`build_data`), and which of
# those inputs the tokenizer depends on (the data depends on all of them).
BUILT_FROM = "built_from.json"
_TOKENIZER_INPUTS = ("corpus", "corpus_options", "tokenizer", "vocab_size", "lowercase",
                     "sample_bytes")


def build_data(run_dir: Path, corpus: list[str], vocab_size: int, lowercase: bool,
               cfg: RunConfig, show_progress: bool, corpus_options: CorpusOptions | None = None,
               sample_bytes: int | None = None, tokenizer: Path | None = None) -> Path:
    """Tokenizer and shards inside RUN_DIR, each built only if not already there from the
    same input.

    Both read the corpus with `corpus_options` (a CorpusOptions). The tokenizer is a copy
    of `tokenizer` (a tokenizer or model directory; with cfg.train.init, by default the
    model's), or else trained on about `sample_bytes` of the corpus. RUN_DIR/BUILT_FROM
    records the input: the corpus files with their sizes and mtimes, and the options that
    shape the result. Where that changed, what it shaped is rebuilt while the run has no
    checkpoint yet, and refused (naming the change) once it has one.
    """
    from bertforge.train.checkpoint import any_checkpoint
    from bertforge.data.corpus import resolve_corpus
    from bertforge.data.prepare import prepare
    from bertforge.data.tokenizer import tokenizer_hash, train_tokenizer

    files = [str(p) for p in resolve_corpus(corpus)]
    tok_dir, data_dir = run_dir / rundir.TOKENIZER, run_dir / rundir.DATA
    if tokenizer is None and cfg.train.init:
        tokenizer = rundir.init_source(Path(cfg.train.init))[1]
    record = _build_record(files, corpus_options, cfg)
    if tokenizer is not None:
        record["tokenizer"] = _copy_hash(tokenizer)
    else:
        record.update(vocab_size=vocab_size, lowercase=lowercase, sample_bytes=sample_bytes)
    changed, known = _changes(run_dir / BUILT_FROM, record, tok_dir)
    # The record is checked against what it describes: an edited one must not pass off
    # another corpus's cached tokenizer and shards as this corpus's.
    mismatch = None if changed else _cache_mismatch(tok_dir, data_dir, files)
    if mismatch:
        changed = ["cache"]
    if not tok_dir.exists():
        stale_tok = False
    elif tokenizer is not None:  # a copy: of this tokenizer, and whole?
        stale_tok = (not (tok_dir / "tokenizer.json").is_file()
                     or tokenizer_hash(tok_dir) != record["tokenizer"])
    else:
        stale_tok = any(k in (*_TOKENIZER_INPUTS, "cache") for k in changed)
    stale_data = data_dir.exists() and bool(changed or stale_tok)
    if (stale_tok or stale_data) and any_checkpoint(run_dir / rundir.CHECKPOINTS):
        if known is None:  # a run of an earlier bertforge: what it was built from is unknown
            print(f"warning: {run_dir} does not record what its tokenizer and data were "
                  f"built from (an earlier bertforge); using them as they are", file=sys.stderr)
            return data_dir
        what = mismatch or _describe(changed[0] if changed else "tokenizer", known, record)
        raise BertforgeError(f"{run_dir} was built from other input ({what}) and its "
                             f"checkpoints were trained on it; give the run's own corpus and "
                             f"options, or another --out")
    for stale, path, kind in ((stale_tok, tok_dir, "tokenizer"), (stale_data, data_dir, "data")):
        if stale:  # only what bertforge wrote there: a folder of the user's is refused
            require_owned(path, kind)
            print(f"pretrain: {path} was built from other input, rebuilding it", file=sys.stderr)
    # Each rebuilt directory replaces the stale one whole (a kill leaves one or the
    # other), and the record goes last: a kill before it means "rebuild" next time.
    # tokenizer and prepare print their own summaries: nothing is printed twice.
    if stale_tok or not (tok_dir / "tokenizer.json").is_file():
        if tokenizer is not None:
            fresh = paths.sibling(tok_dir)
            try:
                copy_tokenizer(tokenizer, fresh)
                replace_owned(fresh, tok_dir, "tokenizer")
            finally:
                shutil.rmtree(fresh, ignore_errors=True)
            if not cfg.train.init:  # _prepare_run read the vocabulary from the stale copy
                tok = load_tokenizer(tok_dir)
                cfg.model.vocab_size = tok.get_vocab_size(with_added_tokens=True)
                cfg.model.pad_token_id = special_token_ids(tok)["pad"]
        else:
            train_tokenizer(files, tok_dir, vocab_size=vocab_size, lowercase=lowercase,
                            show_progress=show_progress, options=corpus_options,
                            sample_bytes=sample_bytes)
    if stale_data or not (data_dir / "manifest.json").is_file():
        prepare(files, tok_dir, data_dir, seq_len=cfg.data.seq_len,
                valid_fraction=cfg.data.valid_fraction, show_progress=show_progress,
                corpus_options=corpus_options,
                document_boundary=cfg.data.document_boundary)
    write_text_atomic(run_dir / BUILT_FROM, json.dumps(record, indent=1) + "\n")
    return data_dir


def _build_record(files: list[str], corpus_options: CorpusOptions | None,
                  cfg: RunConfig) -> dict[str, Any]:
    """The input of `build_data` but the tokenizer's: each corpus file's absolute path,
    size and mtime (an hf: dataset by its name), the corpus-reading options, and the
    data options."""
    corpus = []
    for f in files:
        if f.startswith("hf:"):
            corpus.append([f, None, None])
        else:
            st = os.stat(f)
            corpus.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    options = dataclasses.asdict(corpus_options or CorpusOptions())
    return {"corpus": corpus, "corpus_options": options, "tokenizer": None,
            "vocab_size": None, "lowercase": None, "sample_bytes": None,
            "seq_len": cfg.data.seq_len, "valid_fraction": cfg.data.valid_fraction,
            "document_boundary": cfg.data.document_boundary}


def _changes(path: Path, record: dict[str, Any], tok_dir: Path
             ) -> tuple[list[str], dict[str, Any] | None]:
    """(the inputs in `record` that differ from those recorded at `path`, the recorded
    ones); with nothing recorded, everything differs."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = None
    if not (isinstance(known, dict) and isinstance(known.get("corpus_options"), dict)
            and isinstance(known.get("corpus"), list)
            and all(isinstance(f, list) and len(f) == 3 and isinstance(f[0], str)
                    for f in known["corpus"])):
        return list(record), None
    changed = [k for k, v in record.items() if known.get(k) != v]
    # A resume passes the run's vocab_size, the trained tokenizer's: it can be smaller
    # than the size asked for, on a corpus with fewer word pieces.
    if "vocab_size" in changed and (tok_dir / "tokenizer.json").is_file():
        if load_tokenizer(tok_dir).get_vocab_size(with_added_tokens=True) == record["vocab_size"]:
            changed.remove("vocab_size")
    return changed, known


def _cache_mismatch(tok_dir: Path, data_dir: Path, files: list[str]) -> str | None:
    """What in RUN_DIR's cached data contradicts BUILT_FROM's record of it (the corpus
    files its manifest names, the tokenizer it was made with); None when it agrees or
    there is no data yet."""
    from bertforge.data.tokenizer import tokenizer_hash

    try:
        manifest = json.loads((data_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None  # no complete data: it is (re)built
    made_from = manifest.get("corpus_files") if isinstance(manifest, dict) else None
    if (not isinstance(made_from, list) or len(made_from) != len(files)
            or not all(isinstance(m, str) and _same_file(m, f)
                       for m, f in zip(made_from, files))):
        return (f"{data_dir / 'manifest.json'} names other corpus files than "
                f"{BUILT_FROM} records")
    if (tok_dir / "tokenizer.json").is_file() and \
            manifest.get("tokenizer_hash") != tokenizer_hash(tok_dir):
        return f"{data_dir} was made with another tokenizer than {tok_dir}'s"
    return None


def _same_file(recorded: str, given: str) -> bool:
    """Whether a manifest's corpus path (absolute, or relative to where prepare ran) names
    corpus file `given`."""
    if recorded.startswith("hf:") or given.startswith("hf:"):
        return recorded == given
    if os.path.isabs(recorded):
        return os.path.abspath(recorded) == os.path.abspath(given)
    return Path(os.path.abspath(given)).parts[-len(Path(recorded).parts):] == \
        Path(os.path.normpath(recorded)).parts


def _describe(key: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    """One input that changed, for a message: which corpus file, which option."""
    if key == "corpus":
        was = {f[0]: f[1:] for f in old.get("corpus") or []}
        now = {f[0]: f[1:] for f in new["corpus"]}
        for name in now:
            if name not in was:
                return f"the corpus has a new file {quote(str(name))}"
            if was[name] != now[name]:
                return f"corpus file {quote(str(name))} changed (size or modification time)"
        gone = [name for name in was if name not in now]
        return (f"corpus file {quote(str(gone[0]))} is no longer in it" if gone
                else "the corpus files are in another order")
    if key == "corpus_options":
        was, now = old[key], new[key]
        name = next((k for k in now if was.get(k) != now[k]), None)
        if name is None:
            return "the corpus options"
        return f"corpus option {name} was {quote(repr(was.get(name)))}, now {now[name]!r}"
    if key == "tokenizer":
        return "another tokenizer (--tokenizer, --init)"
    return f"{key} was {quote(repr(old.get(key)))}, now {new[key]!r}"


def _copy_hash(source: Path) -> str:
    """The tokenizer_hash a copy of tokenizer `source` has (a directory with only vocab.txt
    gets a tokenizer.json built, always the same)."""
    from bertforge.data.tokenizer import tokenizer_hash

    with tempfile.TemporaryDirectory() as tmp:  # not in RUN_DIR: a kill leaves nothing there
        return tokenizer_hash(copy_tokenizer(source, Path(tmp) / "tokenizer"))


def check_data(data_dir: Path | list[Path], cfg: RunConfig,
               run_dir: Path | None = None) -> dict[str, Any]:
    """The manifest of the data directory (the first of several, which must agree with
    each other), refused if it does not fit the run's config; with `run_dir` (a resume),
    also if it was made with another tokenizer than the run's. Last, the shards are read
    once (`verify_data`): content changed since prepare, or ids outside the vocabulary,
    are refused before any training."""
    from bertforge.data.loader import as_dirs, load_manifests, verify_data
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
    verify_data(dirs)
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
    saved.train = dataclasses.replace(saved.train)  # checked as a new run's (the warmup)
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
    with (hold_lock(run_dir / rundir.LOCK, f"run directory {run_dir}") if dist.is_main
          else contextlib.nullcontext()):
        # A start that fails before training removes what it made in RUN_DIR, only that
        # (the lock then removes the directories it made).
        undo = Undo(run_dir, RUN_FILES if dist.is_main else ())
        with undo:
            if dist.is_main:
                if resume:  # a kill mid-save left them (the lock says no one is writing one)
                    remove_partial(run_dir / rundir.CHECKPOINTS)
                try:
                    data_dir = _prepare_run(run_dir, cfg, data_dir, corpus, resume, lowercase,
                                            given, show_progress, corpus_options, sample_bytes,
                                            tokenizer)
                finally:
                    dist.wait_for_main()  # on an error too: the others then fail on the missing config
            else:
                dist.wait_for_main()
                if not (run_dir / rundir.CONFIG).is_file():
                    raise BertforgeError(f"rank {dist.rank}: rank 0 could not prepare the run "
                                         f"(its error says why)")
                cfg = RunConfig.load(run_dir / rundir.CONFIG)
                data_dir = as_dirs(cfg.data.path)
            try:
                return _train(run_dir, cfg, data_dir, device, dist, resume,
                              show_progress and dist.is_main, started=undo.done)
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
    if source is not None and not cfg.train.init:  # the vocabulary is the given tokenizer's
        tok = load_tokenizer(tok_dir)
        cfg.model.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        cfg.model.pad_token_id = special_token_ids(tok)["pad"]
    if corpus:
        asked = (given or {}).get("model", {})  # a resume's cfg holds the run's vocab_size
        data_dir = build_data(run_dir, corpus, asked.get("vocab_size", cfg.model.vocab_size),
                              lowercase, cfg, show_progress, corpus_options, sample_bytes,
                              tokenizer)
    elif data_dir is None:
        data_dir = cfg.data.path or run_dir / rundir.DATA  # one directory or a list
    dirs = [d.resolve() for d in as_dirs(data_dir)]
    cfg.data.path = str(dirs[0]) if len(dirs) == 1 else [str(d) for d in dirs]
    manifest = check_data(dirs, cfg, run_dir if resume or source is not None else None)
    # The held-out split was fixed when the data was prepared: config.yaml records that
    # fraction, not the default, and a typed one that differs is refused.
    prepared = float(manifest.get("valid_fraction", cfg.data.valid_fraction))
    typed = (given or {}).get("data", {}).get("valid_fraction")
    if typed is not None and typed != prepared:
        raise BertforgeError(f"data.valid_fraction: {dirs[0]} was prepared with valid_fraction "
                             f"{prepared}, but the run has {typed} (the held-out split is "
                             f"chosen by `bertforge prepare --valid-fraction`)")
    cfg.data.valid_fraction = prepared
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
           dist: Distributed, resume: bool, show_progress: bool,
           started: Callable[[], None] = lambda: None) -> dict[str, Any]:
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
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                 micro_batch_size=micro))
    task = MLMTask(cfg, data_dir, device, dist.rank, dist.world_size, dtype)
    if dist.is_main:
        procs = (f", {dist.world_size} processes ({dist.strategy})" if dist.enabled else "")
        print(f"pretrain: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{len(task.batches.sequences):,} training sequences of {cfg.data.seq_len} "
              f"tokens, batch {cfg.train.batch_size} "
              f"(micro {cfg.train.micro_batch_size}), "
              f"{where}, {'bf16' if dtype else 'fp32'}{procs}",
              file=sys.stderr)
    started()  # from here the run directory holds a run, failed or not
    result = fit(model, task, cfg.train, run_dir, device, dtype, resume=resume, name="pretrain",
                 show_progress=show_progress, dist=dist, run_config=cfg.to_dict())
    weights = gather_model_state(model, dist)  # gathered from the shards under FSDP
    if dist.is_main:
        final = BertForPreTraining(cfg.model)
        load_model_weights(final, weights)
        export_model(final, run_dir / rundir.HF, tokenizer_dir=run_dir / rundir.TOKENIZER)
        write_run_report(run_dir)
    dist.barrier()
    return result


def micro_batch_for(cfg: RunConfig, model: torch.nn.Module, device: torch.device,
                    world_size: int) -> int:
    """The default micro-batch: the whole per-rank batch on a GPU where it fits in
    memory (estimated), else DEFAULT_MICRO_BATCH (bertforge.train.runtime)."""
    m, per_rank = cfg.model, max(cfg.train.batch_size // world_size, 1)
    fixed, per_sequence = training_memory(
        sum(p.numel() for p in model.parameters()), m.num_hidden_layers, m.hidden_size,
        m.num_attention_heads, cfg.data.seq_len, m.vocab_size,
        math.ceil(cfg.data.mask_rate * cfg.data.seq_len))
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
