"""The run's config, resolved once: what `pretrain` trains with and saves as config.yaml.

The command line has already layered preset, config file and flags into a RunConfig. Here
it meets the rest: a resumed run's saved config (forced, except for RESUMABLE_OVERRIDES),
the architecture of an `--init` model, and the prepared data (its vocabulary and special
ids, its held-out fraction, its tokenizer). Each step returns a new RunConfig and refuses,
naming the field, what contradicts it; `model.vocab_size` comes from the data unless a
resumed run or an `--init` model fixes it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bertforge import rundir
from bertforge.commands.loading import init_source
from bertforge.config import RunConfig, TrainConfig
from bertforge.data.loader import DataDirs, as_dirs, load_manifests, verify_data
from bertforge.errors import BertforgeError

Given = dict[str, dict[str, Any]]  # the values the user typed, by section (flags, --config)

# Train-config fields a resume may change; everything else is forced from config.yaml.
# max_steps and time_budget only where the schedule does not depend on them
# (`check_schedule_change`).
RESUMABLE_OVERRIDES = {
    ("train", k)
    for k in (
        "max_steps",
        "time_budget",
        "eval_every",
        "checkpoint_every",
        "log_every",
        "keep_last",
        "device",
        "on_nan",
        "strategy",
        "compile",
        "num_workers",
        "tensorboard",
        "wandb",
    )
} | {("data", "path")}

# ModelConfig fields that make the architecture: a run started from a model keeps them.
ARCHITECTURE = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
)


def resolve_start(
    run_dir: Path, cfg: RunConfig, given: Given, *, resume: bool, tokenizer: Path | None
) -> tuple[RunConfig, Path | None]:
    """(the run's config before its data is known, the tokenizer the run copies rather
    than trains: --tokenizer's, or the --init model's; None on resume, whose tokenizer is
    in RUN_DIR already)."""
    source = None
    if resume:
        rundir.require_run_dir(run_dir)
        cfg = resolve_resume(run_dir, given)
    elif (run_dir / rundir.CHECKPOINTS).exists():
        raise BertforgeError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    elif cfg.train.init:
        if tokenizer is not None:
            raise BertforgeError(
                "give --init or --tokenizer, not both: --init brings the model's own tokenizer"
            )
        cfg, source = apply_init(cfg, cfg.train.init, given.get("model", {}))
    else:
        source = Path(tokenizer) if tokenizer is not None else None
    check_lengths(cfg)  # before any work: building the data can take a while
    return cfg, source


def resolve_data(
    cfg: RunConfig,
    data_dir: DataDirs,
    given: Given,
    *,
    tokenizer_hash: str | None,
    fixed_vocab: bool,
) -> RunConfig:
    """`cfg` with its data: the directories (absolute), the held-out fraction and the
    tokenizer they were prepared with, and unless `fixed_vocab` (a resumed run, an --init
    model) the vocabulary and pad id. The data is checked first (`check_data`)."""
    dirs = [d.resolve() for d in as_dirs(data_dir)]
    manifest = check_data(dirs, cfg, tokenizer_hash, fixed_vocab)
    # The held-out split was fixed when the data was prepared: config.yaml records that
    # fraction, not the default, and a typed one that differs is refused.
    prepared = float(manifest["valid_fraction"])
    typed = given.get("data", {}).get("valid_fraction")
    if typed is not None and typed != prepared:
        raise BertforgeError(
            f"data.valid_fraction: {dirs[0]} was prepared with valid_fraction "
            f"{prepared}, but the run has {typed} (the held-out split is "
            f"chosen by `bertforge prepare --valid-fraction`)"
        )
    model = cfg.model
    if not cfg.train.init:  # an initialised run keeps its model's vocabulary and ids
        model = dataclasses.replace(
            model,
            vocab_size=int(manifest["vocab_size"]),
            pad_token_id=int(manifest["special_token_ids"]["pad"]),
        )
    path = str(dirs[0]) if len(dirs) == 1 else [str(d) for d in dirs]
    data = dataclasses.replace(
        cfg.data, path=path, valid_fraction=prepared, tokenizer_hash=manifest["tokenizer_hash"]
    )  # checked on resume
    return dataclasses.replace(cfg, model=model, data=data)


def check_data(
    data_dir: DataDirs, cfg: RunConfig, tokenizer_hash: str | None = None, fixed_vocab: bool = False
) -> dict[str, Any]:
    """The manifest of the data directory (the first of several, which must agree with
    each other), refused if it does not fit the run's config: its seq_len, its document
    boundary, its tokenizer (`tokenizer_hash`, where the run's is known) and, with
    `fixed_vocab`, its vocabulary. Last, the shards are read once (`verify_data`): content
    changed since prepare, or ids outside the vocabulary, are refused before any training."""
    check_lengths(cfg)
    expected = tokenizer_hash
    dirs = as_dirs(data_dir)
    manifests = load_manifests(dirs)
    for data_dir, manifest in zip(dirs, manifests):
        if int(manifest["seq_len"]) != cfg.data.seq_len:
            raise BertforgeError(
                f"data.seq_len: {data_dir} was prepared with seq_len "
                f"{manifest['seq_len']}, but the run has seq_len "
                f"{cfg.data.seq_len}"
            )
        boundary = manifest["document_boundary"]
        if boundary != cfg.data.document_boundary:
            raise BertforgeError(
                f"data.document_boundary: {data_dir} was prepared with "
                f"{boundary!r}, but the run has "
                f"{cfg.data.document_boundary!r} (--document-boundary)"
            )
        found = manifest["tokenizer_hash"]
        if expected and found != expected:
            hint = (
                f" ({cfg.train.init}'s); prepare the data with --tokenizer {cfg.train.init}"
                if cfg.train.init
                else ""
            )
            raise BertforgeError(
                f"data.tokenizer_hash: {data_dir} was made with tokenizer "
                f"{found}, but the run uses tokenizer {expected}{hint}"
            )
        vocab = int(manifest["vocab_size"])
        # A model's embedding table may have rows past its tokenizer's (padded vocabularies).
        if fixed_vocab and (
            vocab > cfg.model.vocab_size if cfg.train.init else vocab != cfg.model.vocab_size
        ):
            raise BertforgeError(
                f"model.vocab_size: {data_dir} has a vocabulary of "
                f"{vocab}, but the run has {cfg.model.vocab_size}"
            )
        expected = found  # the next must match this one
    verify_data(dirs)
    return manifests[0]


def check_lengths(cfg: RunConfig) -> None:
    if cfg.data.seq_len > cfg.model.max_position_embeddings:
        raise BertforgeError(
            f"data.seq_len {cfg.data.seq_len} exceeds "
            f"model.max_position_embeddings {cfg.model.max_position_embeddings}"
        )


def resolve_resume(run_dir: Path, given: Given) -> RunConfig:
    """The saved config, with only the schedule fields the user re-gave changed.

    Any other field given with a different value is refused, naming the field.
    """
    saved = RunConfig.load(run_dir / rundir.CONFIG)
    changes: Given = {section: {} for section in ("model", "data", "train")}
    for section, values in given.items():
        for key, value in values.items():
            if (section, key) == ("model", "vocab_size"):  # fixed by the tokenizer already built
                continue
            old = getattr(getattr(saved, section), key)
            if old == value:
                continue
            if (section, key) not in RESUMABLE_OVERRIDES:
                raise BertforgeError(
                    f"--resume: {section}.{key} was {old!r} in this run, "
                    f"cannot change it to {value!r}"
                )
            if key in ("max_steps", "time_budget"):
                check_schedule_change(saved.train, key, old, value)
            changes[section][key] = value
    # Every section is rebuilt, so checked as a new run's (the train section's warmup too).
    return dataclasses.replace(
        saved,
        **{
            section: dataclasses.replace(getattr(saved, section), **values)
            for section, values in changes.items()
        },
    )


def check_schedule_change(train: TrainConfig, key: str, old: Any, new: Any) -> None:
    """A resume may change the run's length only where the learning rate of every step
    stays what it was: a constant schedule with its warmup in steps. Otherwise the decay
    to zero (or a warmup that is a fraction of the run) would be re-shaped mid-run, the
    learning rate would jump, and the run would no longer be the one its config says."""
    if train.schedule_depends_on_length:
        why = (
            f"its {train.schedule} schedule decays to zero at the end of the run"
            if train.schedule != "constant"
            else f"its warmup is a fraction ({train.warmup_fraction}) of the run"
        )
        raise BertforgeError(
            f"--resume: train.{key} was {old!r} in this run, cannot change "
            f"it to {new!r}: {why}, so the learning rate of the steps to "
            f"come would change; only runs with --schedule constant and "
            f"--warmup-steps can be lengthened"
        )


def apply_init(
    cfg: RunConfig, init_path: str, given_model: dict[str, Any]
) -> tuple[RunConfig, Path]:
    """(`cfg` with the architecture of the model at `init_path` (cfg.train.init) and that
    path made absolute, the directory of the model's tokenizer). The dropout and other
    values the user gave stay; a given architecture field that contradicts the model is
    refused."""
    init = Path(init_path).expanduser()
    model, tokenizer = init_source(init)
    for key in ARCHITECTURE:
        if key in given_model and given_model[key] != getattr(model, key):
            raise BertforgeError(
                f"--init: model.{key} is {getattr(model, key)!r} in {init}, "
                f"but the flags or --config say {given_model[key]!r}; a "
                f"continued run keeps its model's architecture"
            )
    model = dataclasses.replace(
        model, **{k: v for k, v in given_model.items() if k not in ARCHITECTURE}
    )
    train = dataclasses.replace(cfg.train, init=str(init.resolve()))
    return dataclasses.replace(cfg, model=model, train=train), tokenizer
