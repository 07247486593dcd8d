"""What is loaded is checked against what it will be used with, whatever its checksums say.

A checksum proves that a file is what was written, not that it fits: an optimizer state
of another model (a moment tensor of the wrong shape crashes torch with SIGSEGV), a
tokenizer with ids past the model's vocabulary (IndexError deep in the embedding), a model
whose training cannot fit in memory. Each check refuses in one line naming the file and
the field, before anything uses the object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bertforge.config import ModelConfig, available_memory
from bertforge.errors import BertforgeError

# The optimizer settings that come from the run's config (forced on resume); the learning
# rate is the schedule's, set every step.
_SETTINGS = ("betas", "eps", "weight_decay")


def check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer, where: str) -> None:
    """Refuse an optimizer state_dict that does not fit `optimizer`: its structure, its
    groups and their settings, its parameter count, and each tensor's shape and dtype
    against its parameter's."""
    if not (
        isinstance(state, dict)
        and isinstance(state.get("state"), dict)
        and isinstance(state.get("param_groups"), list)
    ):
        raise BertforgeError(
            f"{where}: not an optimizer state (a mapping with 'state' and "
            f"'param_groups'), but {type(state).__name__}"
        )
    groups, own = state["param_groups"], optimizer.param_groups
    if len(groups) != len(own):
        raise BertforgeError(
            f"{where}: param_groups has {len(groups)} groups, the optimizer {len(own)}"
        )
    params: dict[Any, torch.Tensor] = {}
    for i, (group, mine) in enumerate(zip(groups, own)):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list):
            raise BertforgeError(f"{where}: param_groups[{i}] has no list of params")
        if len(ids) != len(mine["params"]):
            raise BertforgeError(
                f"{where}: param_groups[{i}] holds {len(ids)} parameters, "
                f"the model's {len(mine['params'])}"
            )
        for key in _SETTINGS:
            if key in group and key in mine and _plain(group[key]) != _plain(mine[key]):
                raise BertforgeError(
                    f"{where}: param_groups[{i}].{key} is "
                    f"{_plain(group[key])!r:.40}, the run's config says "
                    f"{_plain(mine[key])!r}"
                )
        params.update(zip(ids, mine["params"]))
    for pid, values in state["state"].items():
        if pid not in params:
            raise BertforgeError(f"{where}: state[{pid!r:.20}] belongs to no parameter")
        if not isinstance(values, dict):
            raise BertforgeError(f"{where}: state[{pid}] is not a mapping")
        p = params[pid]
        for key, t in values.items():
            if not isinstance(t, torch.Tensor):
                raise BertforgeError(f"{where}: state[{pid}].{key} is not a tensor")
            if key == "step":  # a scalar count
                ok = t.numel() == 1 and t.is_floating_point() and bool(torch.isfinite(t).all())
                if not ok:
                    raise BertforgeError(f"{where}: state[{pid}].step is not a step count")
                continue
            if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
                raise BertforgeError(
                    f"{where}: state[{pid}].{key} has shape "
                    f"{tuple(t.shape)} and dtype {t.dtype}, its parameter "
                    f"{tuple(p.shape)} and {p.dtype}"
                )


def _plain(value: Any) -> Any:
    """Tuples as lists: torch.save keeps (0.9, 0.999), a hand-written state may not."""
    return list(value) if isinstance(value, (tuple, list)) else value


def check_tokenizer_fits(config: ModelConfig, tok_dir: Path) -> None:
    """Refuse a tokenizer with an id the model has no embedding for: every special token's
    and its vocabulary size must be below config.vocab_size (an HF directory's config.json
    and tokenizer come from different files, and nothing else ties them). A directory
    without a tokenizer has nothing to contradict: what needs one says it is missing."""
    from bertforge.data.tokenizer import load_tokenizer, special_token_ids

    if not tok_dir.exists():
        return
    tok = load_tokenizer(tok_dir)
    size = tok.get_vocab_size(with_added_tokens=True)
    for name, i in special_token_ids(tok).items():
        if i >= config.vocab_size:
            raise BertforgeError(
                f"{tok_dir}: the tokenizer's [{name.upper()}] has id {i}, "
                f"past the model's vocab_size {config.vocab_size}; the "
                f"tokenizer is not this model's"
            )
    if size > config.vocab_size:
        raise BertforgeError(
            f"{tok_dir}: the tokenizer has {size:,} tokens, the model's "
            f"vocab_size is {config.vocab_size:,}; the tokenizer is not "
            f"this model's"
        )


def training_bytes(config: ModelConfig, micro_batch: int, seq_len: int) -> int:
    """A lower bound on the memory that training `config` takes in fp32: the weights, their
    gradients and AdamW's two moments (16 bytes a parameter), and the activations kept for
    the backward pass at `micro_batch` sequences of `seq_len` tokens (per layer at least
    the attention probabilities and ~8 hidden-sized tensors a token)."""
    tokens = micro_batch * seq_len
    per_layer = tokens * (
        8 * config.hidden_size + 2 * config.intermediate_size + config.num_attention_heads * seq_len
    )
    return 16 * config.num_parameters + 4 * config.num_hidden_layers * per_layer


def check_training_fits(
    config: ModelConfig, micro_batch: int, seq_len: int, device: torch.device
) -> None:
    """Refuse, before any weight is allocated, a training run whose `training_bytes`
    exceed the memory available: MemAvailable on the CPU, the free memory of a GPU.
    A size check of the fp32 weights alone (ModelConfig's) passes a model that needs four
    times that to train."""
    if device.type == "cuda":
        have: int | None = torch.cuda.mem_get_info(device)[0]
        where = f"{device} has"
    else:
        have, where = available_memory(), "this machine has"
    need = training_bytes(config, micro_batch, seq_len)
    if have is not None and need > have:
        raise BertforgeError(
            f"training {config.num_parameters:,} parameters (vocab_size "
            f"{config.vocab_size:,}, hidden_size {config.hidden_size}, "
            f"{config.num_hidden_layers} layers) at {micro_batch} sequences of {seq_len} "
            f"tokens needs at least {need / 1e9:,.1f} GB (weights, gradients, AdamW state, "
            f"activations); {where} {have / 1e9:,.1f} GB available; lower "
            f"--micro-batch-size, or use a smaller model or vocabulary"
        )
