"""FinetuneConfig: the fine-tuning settings, composed with the TrainConfig they train with.

The optimisation (learning rate, batch, schedule, Adam betas, clipping, on_nan, compile,
precision, ...) is a `TrainConfig`, the same dataclass pretraining uses, with BERT's
fine-tuning defaults (`FINETUNE_DEFAULTS`); only what is particular to fine-tuning is a
field of its own. Evaluation and a checkpoint come once an epoch, so the TrainConfig's
eval_every and checkpoint_every are set from the epoch length (`train_config`).

Kept apart from bertforge.finetune (which needs torch) so that the CLI can build its
flags from the fields without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bertforge.config import TrainConfig, _help, build, merge
from bertforge.errors import BertforgeError

# BERT's recipe for base-sized models (Devlin et al. 2019, appendix A.3).
FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 2e-5, "batch_size": 32, "micro_batch_size": 32,
                                     "warmup_fraction": 0.1, "keep_last": 1}
# TrainConfig fields the epoch structure sets, or that only pretraining reads.
NOT_FOR_FINETUNING = ("eval_every", "checkpoint_every", "eval_sequences", "strategy", "init")
# Help texts that read differently for fine-tuning.
FINETUNE_HELP = {
    "lr": "Peak learning rate (2e-5 to 5e-5 suit base-sized models; small ones such as mini "
          "like ~1e-4).",
    "batch_size": "Examples per optimizer step.",
    "micro_batch_size": "Examples per forward/backward (accumulated to the batch).",
    "max_steps": "Stop after N steps (default: epochs x steps per epoch).",
    "keep_last": "Checkpoints to keep (one is written at each epoch's end).",
    "seed": "Seed for the classifier's initialisation, data order and dropout.",
    "warmup_fraction": "Linear warmup over this fraction of the training steps (unless "
                       "--warmup-steps is given).",
}


def finetune_train_config(**values: Any) -> TrainConfig:
    """A TrainConfig with the fine-tuning defaults, then `values`."""
    return TrainConfig(**merge(dict(FINETUNE_DEFAULTS), values))


@dataclass
class FinetuneConfig:
    """Fine-tuning settings; the optimisation is `train`, a TrainConfig."""

    train: TrainConfig = field(default_factory=finetune_train_config)
    epochs: int = _help("Passes over the training set.", default=3)
    max_length: int = _help("Tokens per example, [CLS] and [SEP] included (longer ones "
                            "are truncated).", default=128)
    dropout: float = _help("Dropout on embeddings, attention, sublayers and the classifier "
                           "(replaces the pretrained model's).", default=0.1)
    length_grouping: int = _help("Pad less: sort each run of N batches of the shuffled "
                                 "examples by length, then shuffle the batches (0: off, "
                                 "each batch a random draw; 50 is also what Hugging Face's "
                                 "group_by_length uses).", default=50)
    eval_batch_size: int = _help("Examples per forward pass when evaluating.", default=64)
    max_train_examples: int = _help("Train on the first N examples only (0: all).", default=0)

    def __post_init__(self) -> None:
        checks = {"epochs": (self.epochs >= 1, "must be >= 1"),
                  "max_length": (self.max_length >= 8, "must be >= 8"),
                  "dropout": (0 <= self.dropout < 1, "must be in [0, 1)"),
                  "length_grouping": (self.length_grouping >= 0, "must be >= 0"),
                  "eval_batch_size": (self.eval_batch_size >= 1, "must be >= 1"),
                  "max_train_examples": (self.max_train_examples >= 0, "must be >= 0")}
        for name, (ok, message) in checks.items():
            if not ok:
                raise BertforgeError(f"FinetuneConfig.{name}={getattr(self, name)!r}: {message}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "finetune config") -> FinetuneConfig:
        """From `dataclasses.asdict` output; also the flat form of earlier versions, whose
        optimisation fields sat beside epochs and max_length."""
        if not isinstance(raw, dict):
            raise BertforgeError(f"{where}: expected a mapping")
        trainable = {f.name for f in dataclasses.fields(TrainConfig)} | {"warmup"}
        flat = {k: v for k, v in raw.items() if k in trainable}
        own = {k: v for k, v in raw.items() if k not in trainable}
        train = merge(dict(FINETUNE_DEFAULTS), {**own.pop("train", {}), **flat})
        return build(cls, {**own, "train": train}, where)

    def train_config(self, steps_per_epoch: int) -> TrainConfig:
        """The TrainConfig `fit` runs: evaluation and a checkpoint at every epoch's end."""
        t = self.train
        return dataclasses.replace(t, micro_batch_size=min(t.micro_batch_size, t.batch_size),
                                   max_steps=t.max_steps or self.epochs * steps_per_epoch,
                                   eval_every=steps_per_epoch, checkpoint_every=steps_per_epoch)
