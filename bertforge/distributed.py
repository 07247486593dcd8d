"""Running under torchrun: the process group, DDP / FSDP2 wrapping, and the few collectives
the training loop needs.

`init_from_env` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...)
and returns a `Distributed`; a plain `python -m bertforge` run gets `SINGLE`, whose
methods are no-ops, so the training loop has one code path.

Notable choices:

- Gradients are averaged over ranks by DDP and by FSDP's reduce-scatter; the loop scales
  each rank's loss by the world size so that the result is the gradient of the global
  batch's loss, normalised by the global count of loss terms (DESIGN.md).
- Parameters an objective never uses (the pooler and NSP head under plain MLM) must be
  frozen by the caller: DDP waits for a gradient of every trainable parameter.
- FSDP2 shards each encoder layer and then the root (embeddings, heads). Checkpoints are
  gathered to full, unsharded state on rank 0 (torch.distributed.checkpoint.state_dict
  with full_state_dict=True), so every checkpoint is the same file whatever wrote it
  (one process, DDP or FSDP, any world size) and loads in any of them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bertforge.checkpoint import model_state
from bertforge.errors import BertforgeError

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass
class Distributed:
    """This process's place in the job, and the collectives over it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # "none" (one process), "ddp" or "fsdp"
    _wrapped: nn.Module | None = field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- wrapping ------------------------------------------------------------------------

    def wrap(self, model: nn.Module, device: torch.device,
             dtype: torch.dtype | None) -> nn.Module:
        """The module to run forward/backward through. FSDP shards `model` in place (its
        parameters become DTensors); DDP returns a wrapper around it."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self._wrapped = DistributedDataParallel(model, device_ids=ids)
        elif self.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(device.type, (self.world_size,))
            # bf16 compute with fp32 gradient reduction where FSDP supports it (CUDA);
            # on the CPU autocast alone gives bf16 matmuls.
            mp = (MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
                  if dtype is not None and device.type == "cuda" else MixedPrecisionPolicy())
            for layer in _encoder_layers(model):
                fully_shard(layer, mesh=mesh, mp_policy=mp)
            fully_shard(model, mesh=mesh, mp_policy=mp)
            self._wrapped = model
        else:
            self._wrapped = model
        return self._wrapped

    @contextlib.contextmanager
    def sync_gradients(self, sync: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward: `sync=False` skips the gradient
        all-reduce (every micro-batch of an accumulation but the last)."""
        w = self._wrapped
        if self.strategy == "ddp" and not sync:
            with w.no_sync():  # type: ignore[union-attr]
                yield
        elif self.strategy == "fsdp":
            w.set_requires_gradient_sync(sync)  # type: ignore[union-attr]
            yield
        else:
            yield

    # --- collectives ---------------------------------------------------------------------

    def all_reduce(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64, so integer counts stay exact)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return (torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl"
                else torch.device("cpu"))

    # --- state ---------------------------------------------------------------------------

    @torch.no_grad()
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Scale the gradients to a global L2 norm of at most `max_norm`; the norm before.

        The norm is accumulated in float64 over chunks of each gradient, rather than by
        `clip_grad_norm_`, whose float32 reduction of one large gradient (the word
        embeddings) is off by up to 1e-3 relative on the CPU. That error differs with the
        shape of the shards, and through clipping it made FSDP's losses drift from one
        process's; here every split of the parameters gives the same norm to ~1e-7.
        """
        # Under FSDP each rank holds a shard of each gradient (a DTensor); sum the shards'
        # squares over ranks. DDP's gradients are whole on every rank.
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                 for p in model.parameters() if p.grad is not None]
        squares = [_sum_of_squares(g) for g in grads]
        total = (torch.stack(squares).sum() if squares
                 else torch.zeros((), dtype=torch.float64))
        if self.strategy == "fsdp":
            total = total.to(self._collective_device())
            dist.all_reduce(total)
        norm = total.sqrt().item()
        scale = max_norm / (norm + 1e-6)
        if scale < 1.0:
            for g in grads:
                g.mul_(scale)
        return norm

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full (unsharded) weights on the CPU; a collective under FSDP."""
        if self.strategy != "fsdp":
            return model_state(model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """The optimizer's state_dict in plain single-process form (parameters numbered in
        optimizer order); a collective under FSDP."""
        if self.strategy != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        return _numbered(full) if self.is_main else {}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict) -> None:
        if self.strategy != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        set_optimizer_state_dict(model, optimizer, _named(state, model, optimizer),
                                 options=StateDictOptions(full_state_dict=True))


def _sum_of_squares(t: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """sum(t**2) in float64: float32 norms of rows of `chunk` elements, summed in float64
    (as fast as one float32 norm, and exact to ~1e-8 relative)."""
    flat = t.detach().reshape(-1)
    whole = flat.numel() // chunk * chunk
    total = flat[whole:].double().square().sum()
    if whole:
        rows = torch.linalg.vector_norm(flat[:whole].view(-1, chunk), dim=1)  # (n / chunk,)
        total = total + rows.double().square().sum()
    return total  # on t's device: one sync for the whole norm, not one per gradient


def _encoder_layers(model: nn.Module) -> list[nn.Module]:
    from bertforge.model import BertLayer

    return [m for m in model.modules() if isinstance(m, BertLayer)]


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the ids of a plain state_dict)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _numbered(named: dict) -> dict:
    """A name-keyed optimizer state_dict (torch.distributed.checkpoint's form) -> ids."""
    ids: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        params = [ids.setdefault(n, len(ids)) for n in group["params"]]
        groups.append(dict(group, params=params))
    return {"state": {ids[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def _named(numbered: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    names = _param_names(model, optimizer)
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in numbered["param_groups"]]
    return {"state": {names[int(i)]: s for i, s in numbered["state"].items()},
            "param_groups": groups}


SINGLE = Distributed()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its env)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(strategy: str = "auto", device: torch.device | None = None) -> Distributed:
    """Join the process group torchrun describes; `SINGLE` when not launched by it.

    gloo on the CPU, nccl on CUDA (each process on cuda:LOCAL_RANK).
    """
    if strategy not in STRATEGIES:
        raise BertforgeError(f"strategy {strategy!r}: must be one of {', '.join(STRATEGIES)}")
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # Long timeout: rank 0 may build the tokenizer and shards while the others wait.
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(hours=2))
    return Distributed(rank=rank, world_size=world, local_rank=local_rank,
                       strategy="ddp" if strategy == "auto" else strategy)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
