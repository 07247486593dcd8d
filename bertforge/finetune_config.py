"""FinetuneConfig: the fine-tuning settings, composed with the TrainConfig they train with.

The optimisation (learning rate, batch, schedule, Adam betas, clipping, on_nan, compile,
precision, ...) is a `TrainConfig`, the same dataclass pretraining uses, with BERT's
fine-tuning defaults (`FINETUNE_DEFAULTS`); only what is particular to fine-tuning is a
field of its own. Evaluation and a checkpoint come once an epoch, so the TrainConfig's
eval_every and checkpoint_every are set from the epoch length (`train_config`).

Kept apart from bertforge.commands.finetune (which needs torch) so that the CLI can build its
flags from the fields without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bertforge.config import DEFAULT_MICRO_BATCH, TrainConfig, _help, build, check_rules, merge
from bertforge.errors import BertforgeError

# BERT's recipe for base-sized models (Devlin et al. 2019, appendix A.3).
FINETUNE_DEFAULTS: dict[str, Any] = {
    "lr": 2e-5,
    "batch_size": 32,
    "micro_batch_size": 32,
    "warmup_fraction": 0.1,
    "keep_last": 1,
}
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
    epochs: int = _help("Passes over the training set.", rule=">= 1", default=3)
    max_length: int = _help(
        "Tokens per example, [CLS] and [SEP] included (longer ones are truncated).",
        rule=">= 8",
        default=128,
    )
    dropout: float = _help(
        "Dropout on embeddings, attention, sublayers and the classifier "
        "(replaces the pretrained model's).",
        rule="[0, 1)",
        default=0.1,
    )
    length_grouping: int = _help(
        "Pad less: sort each run of N batches of the shuffled "
        "examples by length, then shuffle the batches (0: off, "
        "each batch a random draw; 50 is also what Hugging Face's "
        "group_by_length uses).",
        rule=">= 0",
        default=50,
    )
    eval_batch_size: int = _help(
        "Examples per forward pass when evaluating.", rule=">= 1", default=64
    )
    max_train_examples: int = _help(
        "Train on the first N examples only (0: all).", rule=">= 0", default=0
    )

    def __post_init__(self) -> None:
        check_rules(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "finetune config") -> FinetuneConfig:
        """From `dataclasses.asdict` output (finetune.json's "config"): the optimisation
        under "train", whose fields not given take the fine-tuning defaults."""
        if not isinstance(raw, dict):
            raise BertforgeError(f"{where}: expected a mapping")
        own = dict(raw)
        train = own.pop("train", {})
        if not isinstance(train, dict):
            raise BertforgeError(f"{where}: train: expected a mapping")
        return build(cls, {**own, "train": merge(dict(FINETUNE_DEFAULTS), train)}, where)

    def train_config(self, steps_per_epoch: int) -> TrainConfig:
        """The TrainConfig `fit` runs: evaluation and a checkpoint at every epoch's end."""
        t = self.train
        micro = min(t.micro_batch_size or DEFAULT_MICRO_BATCH, t.batch_size)
        return dataclasses.replace(
            t,
            micro_batch_size=micro,
            max_steps=t.max_steps or self.epochs * steps_per_epoch,
            eval_every=steps_per_epoch,
            checkpoint_every=steps_per_epoch,
        )
