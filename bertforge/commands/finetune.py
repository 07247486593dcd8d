"""`bertforge finetune` and `predict`: sequence classification and regression on a
pretrained (or, as a baseline, randomly initialised) encoder.

`run_finetune` reads top to bottom: set up OUT (the model, its tokenizer, the tokenized
splits), fit the classification task (bertforge.tasks.classification) with the training
loop pretraining uses, then export the best epoch's weights to OUT/hf. What OUT holds:
docs/run-directory.md#a-fine-tuning-output.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bertforge import rundir
from bertforge.commands.loading import load_any_model, load_run_model
from bertforge.config import DEFAULT_MICRO_BATCH, ModelConfig, RunConfig
from bertforge.data.labelled import TaskData, data_hashes
from bertforge.data.tokenizer import copy_tokenizer, load_truncating_tokenizer
from bertforge.errors import BertforgeError
from bertforge.fileio import hold_lock, write_text_atomic
from bertforge.finetune_config import FinetuneConfig
from bertforge.paths import make_marked
from bertforge.tasks.classification import ClassificationTask, TokenizedSplit, predict_logits
from bertforge.train.consistency import check_tokenizer_fits, check_training_fits
from bertforge.weights import load_model_weights

SPEC, BEST, METRICS_SUMMARY = "finetune.json", "best", "metrics.json"


# ----------------------------------------------------------------------- models, tokenizers


def resolve_model_dir(path: Path) -> Path:
    """A fine-tuning output directory stands for its export, OUT/hf."""
    path = Path(path)
    return path / rundir.HF if (path / SPEC).is_file() and (path / rundir.HF).is_dir() else path


def load_encoder(
    path: Path, weights: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor] | None, Path]:
    """(model config, the encoder's weights or None, tokenizer dir) of a run or HF dir."""
    path = resolve_model_dir(path)
    if rundir.is_run_dir(path):
        if not weights:
            config = RunConfig.load(path / rundir.CONFIG).model
            check_tokenizer_fits(config, path / rundir.TOKENIZER)
            return config, None, path / rundir.TOKENIZER
        model, cfg, tok_dir = load_run_model(path)
        return cfg.model, model.bert.state_dict(), tok_dir
    if (path / "config.json").is_file():
        from bertforge.hf import import_model, model_config_from_hf

        if not weights:
            try:
                raw = json.loads((path / "config.json").read_text())
            except ValueError as e:
                raise BertforgeError(f"{path / 'config.json'}: not valid JSON ({e})") from None
            config = model_config_from_hf(raw)
            check_tokenizer_fits(config, path)
            return config, None, path
        model, config = import_model(path)
        check_tokenizer_fits(config, path)
        return config, model.bert.state_dict(), path
    load_any_model(path)  # raises the error that says what is wrong with `path`
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------ the run


def _check_resume(out: Path, spec: dict[str, Any], given: dict[str, Any] | None) -> FinetuneConfig:
    saved = json.loads((out / SPEC).read_text())
    for key in ("task", "from_scratch"):
        if saved[key] != spec[key]:
            raise BertforgeError(
                f"--resume: {key} was {saved[key]!r} in {out}, cannot change it to {spec[key]!r}"
            )
    # The data itself, not its name: a file of the same name may hold other examples.
    for split, digest in saved["data_sha256"].items():
        if spec["data_sha256"].get(split) != digest:
            raise BertforgeError(
                f"--resume: the {split} data is not what {out} was trained "
                f"on (its content differs); give the run's own data, or "
                f"another --out"
            )
    cfg = FinetuneConfig.from_dict(saved["config"], where=str(out / SPEC))
    for key, value in (given or {}).items():
        old = getattr(cfg.train, key) if hasattr(cfg.train, key) else getattr(cfg, key)
        if old != value:
            raise BertforgeError(
                f"--resume: {key} was {old!r} in {out}, cannot change it to {value!r}"
            )
    return cfg


def run_finetune(
    model_path: Path,
    data: TaskData,
    out_dir: Path,
    cfg: FinetuneConfig | None = None,
    *,
    from_scratch: bool = False,
    resume: bool = False,
    given: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune MODEL (run or HF dir) on `data` into `out_dir`; returns metrics.json's
    content. from_scratch: the same architecture, randomly initialised (the baseline).
    resume: continue from OUT's checkpoint with its saved config (`given`, the values
    the caller insists on, must agree with it)."""
    from bertforge.hf import classifier_config_to_hf, export_model
    from bertforge.model.bert import BertForSequenceClassification
    from bertforge.train.loop import fit
    from bertforge.train.runtime import configure, resolve_device, resolve_precision
    from bertforge.train.tracking import check_available

    start = time.monotonic()
    out = Path(out_dir)
    # One command at a time in OUT: a second is refused, naming this one.
    with hold_lock(out / rundir.LOCK, f"fine-tuning directory {out}"):
        cfg = cfg or FinetuneConfig()
        spec = {
            "model": str(model_path),
            "task": data.name,
            "from_scratch": from_scratch,
            "labels": data.labels,
            "regression": data.regression,
            "data_sha256": data_hashes(data),
        }
        if resume and (out / SPEC).is_file():
            cfg = _check_resume(out, spec, given)
        elif (out / rundir.CHECKPOINTS).exists():
            raise BertforgeError(
                f"{out} already holds a fine-tuning run; pass --resume to "
                f"continue it or choose another --out"
            )
        check_available(cfg.train)  # a missing tracker package, before any work
        if not resume:  # a best/ left by an attempt killed before its first checkpoint
            shutil.rmtree(out / BEST, ignore_errors=True)
        config, encoder, tok_src = load_encoder(Path(model_path), weights=not from_scratch)
        if cfg.max_length > config.max_position_embeddings:
            raise BertforgeError(
                f"max_length {cfg.max_length} exceeds the model's "
                f"max_position_embeddings {config.max_position_embeddings}"
            )
        device = resolve_device(cfg.train.device)
        check_training_fits(
            config,
            min(cfg.train.micro_batch_size or DEFAULT_MICRO_BATCH, cfg.train.batch_size),
            cfg.max_length,
            device,
        )  # before OUT is written to
        make_marked(out, "finetune")
        tok_dir = copy_tokenizer(tok_src, out / rundir.TOKENIZER)
        tok = load_truncating_tokenizer(tok_dir, cfg.max_length)
        pad_id = config.pad_token_id
        train_examples = data.train.head(cfg.max_train_examples)
        t0 = time.monotonic()
        train = TokenizedSplit(
            tok, train_examples.texts, train_examples.pairs, train_examples.y, pad_id
        )
        valid = {
            name: TokenizedSplit(tok, ex.texts, ex.pairs, ex.y, pad_id)
            for name, ex in data.validation.items()
        }
        tokenize_s = time.monotonic() - t0
        write_text_atomic(
            out / SPEC, json.dumps({**spec, "config": dataclasses.asdict(cfg)}, indent=1) + "\n"
        )

        where = configure(device)
        dtype = resolve_precision(cfg.train.precision, device)
        config = dataclasses.replace(
            config, hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout
        )
        torch.manual_seed(cfg.train.seed)
        model = BertForSequenceClassification(config, data.num_labels)
        if encoder is not None:
            model.bert.load_state_dict(encoder)
        model.to(device)
        task = ClassificationTask(data, train, valid, cfg, device, out / BEST)
        train_cfg = cfg.train_config(task.steps_per_epoch)
        print(
            f"finetune {data.name}: {'from scratch' if from_scratch else model_path}, "
            f"{len(train):,} training / {sum(map(len, valid.values())):,} validation examples, "
            f"{task.steps_per_epoch} steps an epoch, {train_cfg.max_steps} steps, "
            f"{where}, {'bf16' if dtype else 'fp32'}",
            file=sys.stderr,
        )
        result = fit(
            model,
            task,
            train_cfg,
            out,
            device,
            dtype,
            resume=resume,
            show_progress=show_progress,
            name=f"finetune {data.name}",
            run_config={**spec, "config": dataclasses.asdict(cfg)},
        )

        best = json.loads((out / BEST / "state.json").read_text())
        load_model_weights(model, load_file(str(out / BEST / best["weights"])))
        export_model(
            model.cpu(),
            out / rundir.HF,
            tokenizer_dir=tok_dir,
            extra_config=classifier_config_to_hf(data.labels),
        )
        summary = _summary(out, data, spec, cfg, result, time.monotonic() - start)
        summary["tokenize_time_s"] = round(tokenize_s, 3)
        write_text_atomic(out / METRICS_SUMMARY, json.dumps(summary, indent=1) + "\n")
        return summary


def _summary(
    out: Path,
    data: TaskData,
    spec: dict[str, Any],
    cfg: FinetuneConfig,
    result: dict[str, Any],
    wall: float,
) -> dict[str, Any]:
    skip = {"kind", "tokens", "elapsed_s"}
    epochs = [
        {k: v for k, v in record.items() if k not in skip}
        for record in map(json.loads, (out / rundir.METRICS).read_text().splitlines())
        if record.get("kind") == "eval"
    ]
    best = json.loads((out / BEST / "state.json").read_text())
    metrics = {k: v for k, v in best.items() if k not in ("step", "weights", "epoch", "score")}
    return {
        "task": data.name,
        "model": spec["model"],
        "from_scratch": spec["from_scratch"],
        "labels": data.labels,
        "metrics": list(data.metrics),
        "epochs": epochs,
        "best_epoch": best["epoch"],
        "best_step": best["step"],
        "best": metrics,
        "score": best["score"],
        "steps": result["step"],
        "train_time_s": result["elapsed_s"],
        "wall_time_s": round(wall, 3),
        "config": dataclasses.asdict(cfg),
        "export": str(out / rundir.HF),
    }


# ---------------------------------------------------------------------------- predict


class Predictor:
    """A fine-tuned classifier, loaded once, that predicts batch after batch: from a
    fine-tuning output directory or its HF export, in fp32.

    max_length 0 (or None): the fine-tuning run's, when its finetune.json is at hand,
    else the model's max_position_embeddings.
    """

    def __init__(self, model_dir: Path, max_length: int | None = 0, device: str = "cpu"):
        from bertforge.hf import import_classifier
        from bertforge.train.runtime import resolve_device

        hf_dir = resolve_model_dir(Path(model_dir))
        model, raw = import_classifier(hf_dir)
        check_tokenizer_fits(model.config, hf_dir)
        if not max_length:
            spec = next((p / SPEC for p in (hf_dir, hf_dir.parent) if (p / SPEC).is_file()), None)
            max_length = (
                json.loads(spec.read_text())["config"]["max_length"]
                if spec
                else model.config.max_position_embeddings
            )
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.tok = load_truncating_tokenizer(hf_dir, max_length)
        self.regression = raw.get("problem_type") == "regression"
        self.names = [
            raw.get("id2label", {}).get(str(i), f"LABEL_{i}") for i in range(model.num_labels)
        ]

    def __call__(
        self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """One {"label", "probabilities"} (classification) or {"score"} (regression) per
        text, in order."""
        data = TokenizedSplit(self.tok, texts, pairs, None, self.model.config.pad_token_id)
        logits = predict_logits(self.model, data, batch_size, self.device)
        if self.regression:
            return [{"score": float(x)} for x in logits[:, 0]]
        probs = torch.from_numpy(logits).double().softmax(-1).numpy()
        return [
            {
                "label": self.names[int(p.argmax())],
                "probabilities": {n: round(float(x), 6) for n, x in zip(self.names, p)},
            }
            for p in probs
        ]

    def blank(self) -> dict[str, Any]:
        """The prediction of an empty text: none, so that every input has its output."""
        return {"score": None} if self.regression else {"label": None, "probabilities": None}


def predict(
    model_dir: Path,
    texts: list[str],
    pairs: list[str] | None = None,
    batch_size: int = 64,
    max_length: int = 0,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One {"label", "probabilities"} (classification) or {"score"} (regression) per text
    (`Predictor`)."""
    return Predictor(model_dir, max_length, device)(texts, pairs, batch_size)
