"""Fine-tuning for sequence classification and regression, through the one training loop.

`ClassificationTask` is the `Task` that `train.fit` runs, so fine-tuning gets AdamW,
warmup and linear decay, bf16, gradient accumulation, checkpoints, exact resume and the
progress bar from the same code as pretraining. The global batch of step t is a pure
function of (seed, t): epoch t // steps_per_epoch's seeded permutation, sliced (the
last batch of an epoch is smaller), each micro-batch padded to its own longest sequence
(`length_grouping` puts examples of similar lengths together, to pad less).
`fit` evaluates once an epoch (eval_every = steps per epoch); the task keeps the weights
of the best epoch on validation, and those are what is exported.

OUT/
  finetune.json   what was run (model, task, labels, config); forced on --resume
  tokenizer/      the model's tokenizer files
  checkpoints/    one per epoch (the newest only), for --resume
  metrics.jsonl   train and eval lines, as in pretraining
  best/           the best epoch's weights so far, and state.json naming them
  metrics.json    validation metrics per epoch, the best epoch, times
  hf/             the export: transformers.BertForSequenceClassification.from_pretrained
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bertforge.train import checkpoint as ckpt
from bertforge import rundir
from bertforge.train.checkpoint import load_model_weights
from bertforge.config import DEFAULT_MICRO_BATCH, ModelConfig, RunConfig
from bertforge.train.consistency import check_tokenizer_fits, check_training_fits
from bertforge.data.labelled import TaskData, data_hashes
from bertforge.data.tokenizer import copy_tokenizer
from bertforge.errors import BertforgeError
from bertforge.fileio import hold_lock, make_dir, write_atomic, write_text_atomic
from bertforge.paths import make_marked
from bertforge.finetune_config import FinetuneConfig
from bertforge.tasks.scores import compute
from bertforge.train.step import StepBatch

SPEC, BEST, METRICS_SUMMARY = "finetune.json", "best", "metrics.json"


# ----------------------------------------------------------------------------- batches

@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    token_type_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T), 1 = real token; None when none is padded
    y: torch.Tensor  # (B,) class ids, or float targets for regression

    # Batches are grouped by length and the epoch's last one is smaller: for
    # torch.compile (bertforge.train.compiling), B and T change from batch to batch.
    DYNAMIC_DIMS: ClassVar[dict[str, tuple[int, ...]]] = {
        "input_ids": (0, 1), "token_type_ids": (0, 1), "attention_mask": (0, 1), "y": (0,)}

    def _map(self, f: Any) -> Batch:
        mask = self.attention_mask
        return Batch(f(self.input_ids), f(self.token_type_ids),
                     f(mask) if mask is not None else None, f(self.y))

    def to(self, device: torch.device) -> Batch:
        """On `device`; the copy does not block when the batch is in pinned memory."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        return self._map(torch.Tensor.pin_memory)


class Encoded:
    """A split's token ids, unpadded; `batch` pads a selection to its longest row."""

    def __init__(self, tok: Any, texts: list[str], pairs: list[str] | None,
                 y: np.ndarray | None, pad_id: int):
        encodings = tok.encode_batch(list(zip(texts, pairs)) if pairs is not None else texts)
        self.ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        self.types = [np.asarray(e.type_ids, dtype=np.int64) for e in encodings]
        self.lengths = np.array([len(i) for i in self.ids], dtype=np.int64)
        self.y = y if y is not None else np.zeros(len(texts), dtype=np.int64)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: np.ndarray) -> Batch:
        T = int(self.lengths[index].max())
        ids = np.full((len(index), T), self.pad_id, dtype=np.int64)
        types = np.zeros((len(index), T), dtype=np.int64)
        mask = np.zeros((len(index), T), dtype=np.int64)
        for row, i in enumerate(index.tolist()):
            n = self.lengths[i]
            ids[row, :n], types[row, :n], mask[row, :n] = self.ids[i], self.types[i], 1
        padded = bool((self.lengths[index] < T).any())
        return Batch(torch.from_numpy(ids), torch.from_numpy(types),
                     torch.from_numpy(mask) if padded else None, torch.from_numpy(self.y[index]))


@torch.no_grad()
def predict_logits(model: torch.nn.Module, data: Encoded, batch_size: int,
                   device: torch.device) -> np.ndarray:
    """(N, num_labels) fp32 logits, in the data's order (batched by length: less padding)."""
    order = np.argsort(data.lengths, kind="stable")
    out = np.empty((len(data), model.num_labels), dtype=np.float32)
    for start in range(0, len(data), batch_size):
        index = order[start:start + batch_size]
        b = data.batch(index).to(device)
        out[index] = model(b.input_ids, b.token_type_ids, b.attention_mask).float().cpu().numpy()
    return out


def split_metrics(data: TaskData, logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The task's metrics and the mean loss, from logits (N, C) and targets (N,)."""
    if data.regression:
        predictions = logits[:, 0]
        loss = float(np.mean((predictions.astype(np.float64) - y) ** 2))
    else:
        predictions = logits.argmax(-1)
        z = logits.astype(np.float64)
        top = z.max(-1)
        logsumexp = top + np.log(np.exp(z - top[:, None]).sum(-1))
        loss = float(np.mean(logsumexp - z[np.arange(len(y)), y]))
    return {**compute(data.metrics, predictions, y), "eval_loss": loss}


class ClassificationTask:
    """Sequence classification (cross-entropy) or regression (squared error) for `fit`."""

    def __init__(self, data: TaskData, train: Encoded, valid: dict[str, Encoded],
                 cfg: FinetuneConfig, device: torch.device, best_dir: Path):
        self.data, self.train, self.valid = data, train, valid
        self.cfg, self.device, self.best_dir = cfg, device, best_dir
        self.batch_size = cfg.train.batch_size
        self.micro_batch_size = min(cfg.train.micro_batch_size or DEFAULT_MICRO_BATCH,
                                    self.batch_size)
        self.steps_per_epoch = math.ceil(len(train) / self.batch_size)
        state = best_dir / "state.json"
        self.best = json.loads(state.read_text()) if state.is_file() else None

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s example order: a seeded permutation. With length_grouping G,
        each run of G batches is then sorted by length and the full batches shuffled, so
        a batch holds examples of similar lengths (less padding); the short one stays last."""
        rng = np.random.default_rng([self.cfg.train.seed, epoch])
        order = rng.permutation(len(self.train))
        G, B = self.cfg.length_grouping, self.batch_size
        if G:
            runs = np.split(order, range(G * B, len(order), G * B))
            order = np.concatenate([r[np.argsort(-self.train.lengths[r], kind="stable")]
                                    for r in runs])
            full = len(order) // B
            batches = order[:full * B].reshape(full, B)[rng.permutation(full)]  # (full, B)
            order = np.concatenate([batches.reshape(-1), order[full * B:]])
        return order

    def batch(self, step: int) -> StepBatch:
        """The examples of step `step` (the last batch of an epoch is smaller), in
        micro-batches each padded to its longest example."""
        epoch, j = divmod(step, self.steps_per_epoch)
        B, mb = self.batch_size, self.micro_batch_size
        index = self._order(epoch)[j * B:(j + 1) * B]
        micro = [self.train.batch(index[s:s + mb]) for s in range(0, len(index), mb)]
        return StepBatch(micro, {"examples": len(index)}, int(self.train.lengths[index].sum()),
                         {"accuracy": "examples"})

    def loss_sum(self, model: torch.nn.Module, micro: Batch
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        logits = model(micro.input_ids, micro.token_type_ids, micro.attention_mask)  # (B, C)
        if self.data.regression:
            return {"examples": F.mse_loss(logits[:, 0].float(), micro.y, reduction="sum")}, {}
        loss = F.cross_entropy(logits.float(), micro.y, reduction="sum")
        return {"examples": loss}, {"accuracy": (logits.detach().argmax(-1) == micro.y).sum()}

    def epoch_at(self, step: int) -> float:
        return step / self.steps_per_epoch

    def evaluate(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        result: dict[str, Any] = {"epoch": round(self.epoch_at(step), 4)}
        scores = []
        for name, split in self.valid.items():
            logits = predict_logits(model, split, self.cfg.eval_batch_size, self.device)
            values = split_metrics(self.data, logits, split.y)
            result.update({(f"{k}_{name}" if name else k): v for k, v in values.items()})
            scores += [values[k] for k in self.data.score]
        result["score"] = float(np.mean(scores))
        # A best from a later step belongs to an attempt abandoned by a resume: replace it.
        if self.best is None or step <= self.best["step"] or \
                result["score"] > self.best["score"]:
            self._save_best(model, step, result)
        return result

    def _save_best(self, model: torch.nn.Module, step: int, result: dict[str, Any]) -> None:
        """Weights under a new name, then state.json naming them replaced atomically, then
        the previous weights removed: a kill at any point leaves a consistent best/."""
        make_dir(self.best_dir)
        name = f"step-{step:06d}.safetensors"
        weights = ckpt.model_state(model)
        ckpt.require_finite(weights, f"not keeping the weights of step {step} as the best")
        write_atomic(self.best_dir / name, lambda tmp: save_file(weights, str(tmp)))
        self.best = {"step": step, "weights": name, **result}
        write_text_atomic(self.best_dir / "state.json", json.dumps(self.best, indent=1) + "\n")
        for old in self.best_dir.glob("step-*.safetensors"):
            if old.name != name:
                old.unlink()


# ----------------------------------------------------------------------- models, tokenizers

def resolve_model_dir(path: Path) -> Path:
    """A fine-tuning output directory stands for its export, OUT/hf."""
    path = Path(path)
    return path / rundir.HF if (path / SPEC).is_file() and (path / rundir.HF).is_dir() else path


def load_encoder(path: Path, weights: bool = True
                 ) -> tuple[ModelConfig, dict[str, torch.Tensor] | None, Path]:
    """(model config, the encoder's weights or None, tokenizer dir) of a run or HF dir."""
    path = resolve_model_dir(path)
    if rundir.is_run_dir(path):
        if not weights:
            config = RunConfig.load(path / rundir.CONFIG).model
            check_tokenizer_fits(config, path / rundir.TOKENIZER)
            return config, None, path / rundir.TOKENIZER
        model, cfg, tok_dir = rundir.load_run_model(path)
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
    rundir.load_any_model(path)  # raises the error that says what is wrong with `path`
    raise AssertionError("unreachable")


def load_tokenizer_any(tok_dir: Path, max_length: int) -> Any:
    """The tokenizer of a run or HF directory (tokenizer.json, or a BERT vocab.txt), set to
    truncate to `max_length` (longest first, for pairs) and not to pad."""
    from bertforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(tok_dir))
    tok.enable_truncation(max_length)
    return tok


# ------------------------------------------------------------------------------ the run

def _check_resume(out: Path, spec: dict[str, Any], given: dict[str, Any] | None
                  ) -> FinetuneConfig:
    saved = json.loads((out / SPEC).read_text())
    for key in ("task", "from_scratch"):
        if saved[key] != spec[key]:
            raise BertforgeError(f"--resume: {key} was {saved[key]!r} in {out}, "
                                 f"cannot change it to {spec[key]!r}")
    # The data itself, not its name: a file of the same name may hold other examples.
    # (Runs of earlier versions recorded none.)
    for split, digest in (saved.get("data_sha256") or {}).items():
        if spec["data_sha256"].get(split) != digest:
            raise BertforgeError(f"--resume: the {split} data is not what {out} was trained "
                                 f"on (its content differs); give the run's own data, or "
                                 f"another --out")
    cfg = FinetuneConfig.from_dict(saved["config"], where=str(out / SPEC))
    for key, value in (given or {}).items():
        old = getattr(cfg.train, key) if hasattr(cfg.train, key) else getattr(cfg, key)
        if old != value:
            raise BertforgeError(f"--resume: {key} was {old!r} in {out}, "
                                 f"cannot change it to {value!r}")
    return cfg


def run_finetune(model_path: Path, data: TaskData, out_dir: Path,
                 cfg: FinetuneConfig | None = None, *, from_scratch: bool = False,
                 resume: bool = False, given: dict[str, Any] | None = None,
                 show_progress: bool = True) -> dict[str, Any]:
    """Fine-tune MODEL (run or HF dir) on `data` into `out_dir`; returns metrics.json's
    content. from_scratch: the same architecture, randomly initialised (the baseline).
    resume: continue from OUT's checkpoint with its saved config (`given`, the values
    the caller insists on, must agree with it)."""
    from bertforge.hf import classifier_config_to_hf, export_model
    from bertforge.model.bert import BertForSequenceClassification
    from bertforge.train.runtime import configure, resolve_device, resolve_precision
    from bertforge.train.tracking import check_available
    from bertforge.train.loop import fit

    start = time.monotonic()
    out = Path(out_dir)
    # One command at a time in OUT: a second is refused, naming this one.
    with hold_lock(out / rundir.LOCK, f"fine-tuning directory {out}"):
        cfg = cfg or FinetuneConfig()
        spec = {"model": str(model_path), "task": data.name, "from_scratch": from_scratch,
                "labels": data.labels, "regression": data.regression,
                "data_sha256": data_hashes(data)}
        if resume and (out / SPEC).is_file():
            cfg = _check_resume(out, spec, given)
        elif (out / rundir.CHECKPOINTS).exists():
            raise BertforgeError(f"{out} already holds a fine-tuning run; pass --resume to "
                                 f"continue it or choose another --out")
        check_available(cfg.train)  # a missing tracker package, before any work
        if not resume:  # a best/ left by an attempt killed before its first checkpoint
            shutil.rmtree(out / BEST, ignore_errors=True)
        config, encoder, tok_src = load_encoder(Path(model_path), weights=not from_scratch)
        if cfg.max_length > config.max_position_embeddings:
            raise BertforgeError(f"max_length {cfg.max_length} exceeds the model's "
                                 f"max_position_embeddings {config.max_position_embeddings}")
        device = resolve_device(cfg.train.device)
        check_training_fits(config, min(cfg.train.micro_batch_size or DEFAULT_MICRO_BATCH,
                                        cfg.train.batch_size),
                            cfg.max_length, device)  # before OUT is written to
        make_marked(out, "finetune")
        tok_dir = copy_tokenizer(tok_src, out / rundir.TOKENIZER)
        tok = load_tokenizer_any(tok_dir, cfg.max_length)
        pad_id = config.pad_token_id
        train_examples = data.train.head(cfg.max_train_examples)
        t0 = time.monotonic()
        train = Encoded(tok, train_examples.texts, train_examples.pairs, train_examples.y, pad_id)
        valid = {name: Encoded(tok, ex.texts, ex.pairs, ex.y, pad_id)
                 for name, ex in data.validation.items()}
        tokenize_s = time.monotonic() - t0
        write_text_atomic(out / SPEC, json.dumps({**spec, "config": dataclasses.asdict(cfg)},
                                                 indent=1) + "\n")

        where = configure(device)
        dtype = resolve_precision(cfg.train.precision, device)
        config = dataclasses.replace(config, hidden_dropout_prob=cfg.dropout,
                                     attention_probs_dropout_prob=cfg.dropout)
        torch.manual_seed(cfg.train.seed)
        model = BertForSequenceClassification(config, data.num_labels)
        if encoder is not None:
            model.bert.load_state_dict(encoder)
        model.to(device)
        task = ClassificationTask(data, train, valid, cfg, device, out / BEST)
        train_cfg = cfg.train_config(task.steps_per_epoch)
        print(f"finetune {data.name}: {'from scratch' if from_scratch else model_path}, "
              f"{len(train):,} training / {sum(map(len, valid.values())):,} validation examples, "
              f"{task.steps_per_epoch} steps an epoch, {train_cfg.max_steps} steps, "
              f"{where}, {'bf16' if dtype else 'fp32'}", file=sys.stderr)
        result = fit(model, task, train_cfg, out, device, dtype, resume=resume,
                     show_progress=show_progress, name=f"finetune {data.name}",
                     run_config={**spec, "config": dataclasses.asdict(cfg)})

        best = json.loads((out / BEST / "state.json").read_text())
        load_model_weights(model, load_file(str(out / BEST / best["weights"])))
        export_model(model.cpu(), out / rundir.HF, tokenizer_dir=tok_dir,
                     extra_config=classifier_config_to_hf(data.labels))
        summary = _summary(out, data, spec, cfg, result, time.monotonic() - start)
        summary["tokenize_time_s"] = round(tokenize_s, 3)
        write_text_atomic(out / METRICS_SUMMARY, json.dumps(summary, indent=1) + "\n")
        return summary


def _summary(out: Path, data: TaskData, spec: dict[str, Any], cfg: FinetuneConfig,
             result: dict[str, Any], wall: float) -> dict[str, Any]:
    skip = {"kind", "tokens", "elapsed_s"}
    epochs = [{k: v for k, v in record.items() if k not in skip}
              for record in map(json.loads, (out / rundir.METRICS).read_text().splitlines())
              if record.get("kind") == "eval"]
    best = json.loads((out / BEST / "state.json").read_text())
    metrics = {k: v for k, v in best.items() if k not in ("step", "weights", "epoch", "score")}
    return {"task": data.name, "model": spec["model"], "from_scratch": spec["from_scratch"],
            "labels": data.labels, "metrics": list(data.metrics), "epochs": epochs,
            "best_epoch": best["epoch"], "best_step": best["step"], "best": metrics,
            "score": best["score"], "steps": result["step"],
            "train_time_s": result["elapsed_s"], "wall_time_s": round(wall, 3),
            "config": dataclasses.asdict(cfg), "export": str(out / rundir.HF)}


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
            spec = next((p / SPEC for p in (hf_dir, hf_dir.parent) if (p / SPEC).is_file()),
                        None)
            max_length = (json.loads(spec.read_text())["config"]["max_length"] if spec
                          else model.config.max_position_embeddings)
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.tok = load_tokenizer_any(hf_dir, max_length)
        self.regression = raw.get("problem_type") == "regression"
        self.names = [raw.get("id2label", {}).get(str(i), f"LABEL_{i}")
                      for i in range(model.num_labels)]

    def __call__(self, texts: list[str], pairs: list[str] | None = None,
                 batch_size: int = 64) -> list[dict[str, Any]]:
        """One {"label", "probabilities"} (classification) or {"score"} (regression) per
        text, in order."""
        data = Encoded(self.tok, texts, pairs, None, self.model.config.pad_token_id)
        logits = predict_logits(self.model, data, batch_size, self.device)
        if self.regression:
            return [{"score": float(x)} for x in logits[:, 0]]
        probs = torch.from_numpy(logits).double().softmax(-1).numpy()
        return [{"label": self.names[int(p.argmax())],
                 "probabilities": {n: round(float(x), 6) for n, x in zip(self.names, p)}}
                for p in probs]

    def blank(self) -> dict[str, Any]:
        """The prediction of an empty text: none, so that every input has its output."""
        return {"score": None} if self.regression else {"label": None, "probabilities": None}


def predict(model_dir: Path, texts: list[str], pairs: list[str] | None = None,
            batch_size: int = 64, max_length: int = 0, device: str = "cpu"
            ) -> list[dict[str, Any]]:
    """One {"label", "probabilities"} (classification) or {"score"} (regression) per text
    (`Predictor`)."""
    return Predictor(model_dir, max_length, device)(texts, pairs, batch_size)
