"""FinetuneConfig: the fine-tuning hyperparameters, and the TrainConfig they imply.

Kept apart from bertforge.finetune (which needs torch) so that the CLI can build its
flags from the fields without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from bertforge.config import TrainConfig, _help
from bertforge.errors import BertforgeError


@dataclass
class FinetuneConfig:
    """Fine-tuning hyperparameters; the defaults are BERT's recipe for base-sized models."""

    lr: float = _help("Peak learning rate (2e-5 to 5e-5 suit base-sized models; small "
                      "ones such as mini like ~1e-4).", default=2e-5)
    epochs: int = _help("Passes over the training set.", default=3)
    batch_size: int = _help("Examples per optimizer step.", default=32)
    micro_batch_size: int = _help("Examples per forward/backward (accumulated to the batch).",
                                  default=32)
    max_length: int = _help("Tokens per example, [CLS] and [SEP] included (longer ones "
                            "are truncated).", default=128)
    warmup: float = _help("Linear warmup: steps if >= 1, else a fraction of the run.",
                          default=0.1)
    weight_decay: float = _help("AdamW weight decay (not on biases and LayerNorm).",
                                default=0.01)
    dropout: float = _help("Dropout on embeddings, attention, sublayers and the classifier "
                           "(replaces the pretrained model's).", default=0.1)
    grad_clip: float = _help("Clip the gradient norm to this (0 disables).", default=1.0)
    seed: int = _help("Seed for the classifier's initialisation, data order and dropout.",
                      default=0)
    length_grouping: int = _help("Pad less: sort each run of N batches of the shuffled "
                                 "examples by length, then shuffle the batches (0: off; "
                                 "Hugging Face's group_by_length uses 50).", default=0)
    eval_batch_size: int = _help("Examples per forward pass when evaluating.", default=64)
    max_train_examples: int = _help("Train on the first N examples only (0: all).", default=0)
    max_steps: int | None = _help("Stop after N steps (default: epochs x steps per epoch).",
                                  default=None)
    log_every: int = _help("Write a train metrics line every N steps.", default=10)
    keep_last: int = _help("Checkpoints to keep (one is written at each epoch's end).",
                           default=1)
    precision: str = _help("'auto' (bf16 where supported), 'bf16' or 'fp32'.", default="auto")
    device: str = _help("'auto', 'cpu', 'cuda' or 'cuda:N'.", default="auto")

    def __post_init__(self) -> None:
        checks = {"lr": self.lr > 0, "epochs": self.epochs >= 1,
                  "batch_size": self.batch_size >= 1,
                  "micro_batch_size": self.micro_batch_size >= 1,
                  "max_length": self.max_length >= 8, "warmup": self.warmup >= 0,
                  "weight_decay": self.weight_decay >= 0, "dropout": 0 <= self.dropout < 1,
                  "grad_clip": self.grad_clip >= 0, "seed": self.seed >= 0,
                  "eval_batch_size": self.eval_batch_size >= 1,
                  "length_grouping": self.length_grouping >= 0,
                  "max_train_examples": self.max_train_examples >= 0,
                  "max_steps": self.max_steps is None or self.max_steps >= 1,
                  "log_every": self.log_every >= 1, "keep_last": self.keep_last >= 1,
                  "precision": self.precision in ("auto", "bf16", "fp32")}
        for name, ok in checks.items():
            if not ok:
                raise BertforgeError(f"FinetuneConfig.{name}={getattr(self, name)!r}: out of "
                                     f"range (see --help)")

    def train_config(self, steps_per_epoch: int) -> TrainConfig:
        """The TrainConfig `fit` runs: evaluation and a checkpoint at every epoch's end."""
        return TrainConfig(batch_size=self.batch_size,
                           micro_batch_size=min(self.micro_batch_size, self.batch_size),
                           lr=self.lr, weight_decay=self.weight_decay, warmup=self.warmup,
                           max_steps=self.max_steps or self.epochs * steps_per_epoch,
                           grad_clip=self.grad_clip, seed=self.seed,
                           eval_every=steps_per_epoch, checkpoint_every=steps_per_epoch,
                           keep_last=self.keep_last, log_every=self.log_every,
                           precision=self.precision, device=self.device)
