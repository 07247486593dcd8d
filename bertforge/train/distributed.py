"""Running under torchrun: the process group, DDP / FSDP2 wrapping, and the few collectives
the training loop needs.

`init_from_env` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...)
and returns a `Distributed`; a plain `python -m bertforge` run gets `Distributed()`, one
process whose collectives are no-ops, so the training loop has one code path. The ranks
wait for rank 0's data preparation on a gloo group with a long timeout (`wait_for_main`)
and take its choice of checkpoint (`broadcast_object`); the training collectives keep the
backend's default timeout. Parameters an objective never uses must be frozen by the
caller: DDP waits for a gradient of every trainable parameter. How gradients are averaged
and how FSDP2 shards the model: docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import nn

from bertforge.errors import BertforgeError
from bertforge.model import ops

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

STRATEGIES = ("auto", "ddp", "fsdp")
PREPARE_TIMEOUT = datetime.timedelta(hours=2)  # how long the ranks wait for rank 0's data


@dataclass
class Distributed:
    """This process's place in the job, and the collectives over it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # "none" (one process), "ddp" or "fsdp"
    _wrapped: nn.Module | None = field(default=None, repr=False)
    _waiting: Any = field(default=None, repr=False)  # the gloo group of `wait_for_main`

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- wrapping ------------------------------------------------------------------------

    def wrap(self, model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
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
            # bf16 compute with fp32 gradient reduction: each gather casts the weights
            # once for all their uses; master weights and optimizer state stay fp32.
            mp = (
                MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
                if dtype is not None
                else MixedPrecisionPolicy()
            )
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
            with cast("DistributedDataParallel", w).no_sync():
                yield
        elif self.strategy == "fsdp":
            # Between the micro-batches of one step the parameters stay gathered and the
            # gradients unreduced; the last one reduce-scatters and reshards as usual.
            sharded = cast("FSDPModule", w)  # fully_shard made the model one
            sharded.set_requires_gradient_sync(sync)
            sharded.set_reshard_after_backward(sync)
            yield
        else:
            yield

    # --- collectives ---------------------------------------------------------------------

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over ranks (in place, and returned), on the collective device; no
        host synchronisation on a GPU (the collective is queued on the stream)."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def host_values(self, values: list[float]) -> torch.Tensor:
        """Host numbers as a float64 tensor on the collective device, copied without
        blocking (pinned) where that is a GPU."""
        t = torch.tensor(values, dtype=torch.float64)
        device = self.collective_device()
        if device.type == "cuda":
            t = t.pin_memory().to(device, non_blocking=True)
        return t

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

    def wait_for_main(self) -> None:
        """A barrier for work rank 0 does alone before training (data, tokenizer), on a
        gloo group with PREPARE_TIMEOUT: the training collectives keep their default."""
        if self.enabled:
            dist.barrier(group=self._waiting)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._waiting)
        return box[0]

    def collective_device(self) -> torch.device:
        """Where tensors handed to collectives live: the GPU under nccl, else the CPU."""
        if self.enabled and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    # --- gradients -----------------------------------------------------------------------

    @torch.no_grad()
    def clip_grad_norm(self, parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """The global L2 norm of the gradients of `parameters`, as a float64 0-dim tensor on
        their device; with max_norm > 0 the gradients are first scaled to a norm of at most
        max_norm. Nothing is read to the host: the scale is applied on the device.

        The squares are summed in float64 (`ops.grad_norm_squared`), so every split of
        the parameters over ranks gives the same norm, and through clipping the same
        losses, as one process. Under FSDP each rank holds a shard of each gradient (a
        DTensor) and the shards' squares are summed over ranks; DDP's gradients are
        whole on every rank.
        """
        grads = [
            p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            for p in parameters
            if p.grad is not None
        ]
        total = ops.grad_norm_squared(grads)
        if self.strategy == "fsdp":
            total = self.reduce_sum(total.to(self.collective_device()))
        norm = total.sqrt()
        if max_norm > 0 and grads:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].device, torch.float32)
            torch._foreach_mul_(grads, scale)
        return norm


def _encoder_layers(model: nn.Module) -> list[nn.Module]:
    from bertforge.model.bert import BertLayer

    return [m for m in model.modules() if isinstance(m, BertLayer)]


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its env)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(strategy: str = "auto", device: torch.device | None = None) -> Distributed:
    """Join the process group torchrun describes; one process (`Distributed()`) when not
    launched by it.

    gloo on the CPU, nccl on CUDA (each process on cuda:LOCAL_RANK).
    """
    if strategy not in STRATEGIES:
        raise BertforgeError(f"strategy {strategy!r}: must be one of {', '.join(STRATEGIES)}")
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return Distributed()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # The backend's default timeout for the training collectives; with device_id the
        # NCCL communicator is bound to this rank's GPU at once.
        dist.init_process_group(
            "nccl" if cuda else "gloo", device_id=torch.device("cuda", local_rank) if cuda else None
        )
    # Rank 0 may build the tokenizer and shards while the others wait: they wait on a
    # gloo group of their own, whose long timeout no training collective shares.
    waiting = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    return Distributed(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        strategy="ddp" if strategy == "auto" else strategy,
        _waiting=waiting,
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
