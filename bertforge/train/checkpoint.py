"""Checkpoints: the `Checkpointer` that saves and restores a run, and the files it writes.

The `Checkpointer` is the one owner of a run's checkpoints: it gathers the full state from
every rank (FSDP's shards included), saves it with each rank's RNG, chooses the checkpoint
a resume starts from (rank 0 chooses, every rank follows) and restores the weights, the
optimizer, the loop's `TrainState` and the RNG. A checkpoint (safetensors weights,
optimizer state, JSON run state holding every file's sha256) is written into a temporary
directory, fsynced and renamed into place before `checkpoints/latest` names it, and a
resume takes the newest one that verifies. Nothing pickled is loaded without
`weights_only=True`, and weights that are not finite are never written. The whole
contract: docs/architecture.md#the-checkpointer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from bertforge.errors import BertforgeError
from bertforge.fileio import fsync, give_usual_mode, make_dir, write_text_atomic
from bertforge.train.consistency import check_optimizer_state
from bertforge.weights import (
    load_model_weights,
    load_pickled,
    load_safetensors,
    model_state,
    require_finite,
    short,
)

if TYPE_CHECKING:
    from bertforge.train.distributed import Distributed
    from bertforge.train.step import StepResult

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "state.json"
_PREFIX = "step-"
_RANK_SEED = 1_000_003  # rank r > 0 seeds its dropout with seed + r * _RANK_SEED


class Checkpointer:
    """Saves and restores everything stateful in a run, under `ckpt_dir`.

    Every rank makes one and calls each method (they are collectives); rank 0 alone
    reads the directory to choose and writes. The state.json of a checkpoint holds the
    loop's `TrainState`, the epoch, the world size and strategy that wrote it, and the
    RNG: rank 0's as "rng", and under torchrun every rank's as "rng_ranks".
    """

    def __init__(self, ckpt_dir: Path, dist: Distributed, device: torch.device, keep_last: int = 3):
        self.dir, self.dist, self.device, self.keep_last = Path(ckpt_dir), dist, device, keep_last
        self.found: Path | None = None  # the checkpoint `choose` found to resume from
        self.found_state: dict[str, Any] = {}  # its state.json
        self.saved_at: int | None = None  # the step of the newest checkpoint of this run

    def choose(self, resume: bool) -> Path | None:
        """The checkpoint to resume from: None for a fresh run, or for a resume of a run
        killed before its first checkpoint was complete. Rank 0 chooses and every rank
        takes its choice (or its error): ranks looking each for themselves could disagree
        on a shared filesystem that caches attributes."""
        if not resume:
            return None
        choice: tuple[str, Any, Any] = ("none", None, None)
        if self.dist.is_main:
            try:
                found = find_latest(self.dir)
                if found is None and any_checkpoint(self.dir):
                    # all damaged: starting over would overwrite them
                    raise BertforgeError(
                        f"--resume: no checkpoint in {self.dir} verifies "
                        f"(see the warnings above); move them away to "
                        f"start over"
                    )
                if found is not None:
                    choice = ("found", str(found[0]), found[1])
            except BertforgeError as e:
                choice = ("error", str(e), None)
        kind, value, saved = self.dist.broadcast_object(choice)
        if kind == "error":
            raise BertforgeError(value)
        if kind == "none":
            if self.dist.is_main:
                print(
                    f"--resume: no checkpoint in {self.dir} yet; starting from step 0",
                    file=sys.stderr,
                )
            return None
        self.found, self.found_state = Path(value), saved
        return self.found

    def load_weights(self, model: torch.nn.Module) -> None:
        """The chosen checkpoint's weights into `model`, if one was chosen. Called before
        the model is sharded: every rank reads the full file."""
        if self.found is not None:
            load_model_weights(model, load_weights(self.found))

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: TrainState,
        seed: int,
        max_steps: int | None = None,
    ) -> None:
        """The chosen checkpoint's optimizer state, loop state and RNG; for a fresh run,
        each rank past the first seeds its own dropout (the weights are the same)."""
        if self.found is None:
            if self.dist.rank > 0:
                torch.manual_seed(seed + _RANK_SEED * self.dist.rank)
            return
        path, saved = self.found, self.found_state
        optimizer_state = load_optimizer_state(path)
        check_optimizer_state(optimizer_state, optimizer, str(path / OPTIMIZER_FILE))
        load_full_optimizer_state(model, optimizer, optimizer_state, self.dist)
        where = str(path / STATE_FILE)
        state.load_state_dict(saved, where, max_steps)
        self._restore_rng(saved, seed, where)
        self.saved_at = state.step
        if self.dist.is_main:
            print(
                f"resuming from {path.name} (step {state.step}, {state.tokens:,} tokens)",
                file=sys.stderr,
            )

    def _restore_rng(self, saved: dict[str, Any], seed: int, where: str) -> None:
        """This rank's saved RNG when the world size is the one that saved. Otherwise data
        order and masks still continue exactly (they depend on the step alone), but
        dropout's random streams start afresh: each rank is reseeded."""
        dist = self.dist
        rngs = saved.get("rng_ranks") or [saved.get("rng")]
        if not isinstance(rngs, list) or not all(isinstance(r, dict) for r in rngs):
            raise BertforgeError(f"{where}: rng is missing or not a random generator state")
        if len(rngs) == dist.world_size:
            set_rng_state(rngs[dist.rank], self.device, where)
            return
        torch.manual_seed(seed + _RANK_SEED * dist.rank + saved["step"])
        if dist.is_main:
            print(
                f"resuming a run saved by {len(rngs)} process(es) with {dist.world_size}: "
                f"data order and masks continue exactly; dropout's random stream restarts",
                file=sys.stderr,
            )

    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: TrainState,
        epoch: float,
    ) -> None:
        """A checkpoint of the full state at `state.step`; a collective (FSDP gathers its
        shards), written by rank 0."""
        dist = self.dist
        weights = gather_model_state(model, dist)
        optimizer_state = gather_optimizer_state(model, optimizer, dist)
        rngs = dist.gather_objects(rng_state(self.device))
        if dist.is_main:
            record = {
                **state.state_dict(),
                "rng": rngs[0],
                "epoch": epoch,
                "world_size": dist.world_size,
                "strategy": dist.strategy,
            }
            if dist.enabled:
                record["rng_ranks"] = rngs
            save_checkpoint(self.dir, state.step, weights, optimizer_state, record, self.keep_last)
        dist.barrier()
        self.saved_at = state.step


@dataclass
class TrainState:
    """The loop's own state: all a checkpoint holds besides weights, optimizer and RNG.
    The data position is the step itself, because batches are a pure function of it."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # real input tokens trained on, all processes together
    elapsed_s: float = 0.0  # training time (evaluation and checkpoints excluded)
    skipped_steps: int = 0  # updates dropped for a non-finite loss or gradient

    def advance(self, result: StepResult) -> None:
        self.step += 1
        self.tokens += result.tokens
        self.skipped_steps += not result.applied
        self.elapsed_s = result.elapsed_s or 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed_s,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(
        self, state: dict[str, Any], where: str = "state", max_steps: int | None = None
    ) -> None:
        """Restore from `state_dict()`'s output (other keys are ignored).

        A value that cannot be restored is refused (BertforgeError naming `where` and the
        field): a state.json's checksums only say that it is what was sealed. So is a
        step past the run's `max_steps`: no run of this config wrote it.
        """
        self.step, self.tokens = _count(state, "step", where), _count(state, "tokens", where)
        if max_steps and self.step > max_steps:
            raise BertforgeError(
                f"{where}: step {self.step} is past the run's max_steps "
                f"{max_steps} (a state from another run, or --max-steps "
                f"lowered below it)"
            )
        elapsed = state.get("elapsed_s")
        if (
            isinstance(elapsed, bool)
            or not isinstance(elapsed, (int, float))
            or not math.isfinite(elapsed)
            or elapsed < 0
        ):
            raise BertforgeError(f"{where}: elapsed_s {elapsed!r:.40} is not a time in seconds")
        self.elapsed_s = float(elapsed)
        self.skipped_steps = _count(state, "skipped_steps", where)


def _count(state: dict[str, Any], name: str, where: str) -> int:
    """state[name], which must be an integer that int64 holds, >= 0."""
    value = state.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise BertforgeError(f"{where}: {name} {value!r:.40} is not a count (an integer >= 0)")
    return value


# ------------------------------------------------------------------------- the RNG


def rng_state(device: torch.device) -> dict[str, str]:
    """torch's CPU generator, and the device's when it is a GPU (a CPU run never touches
    CUDA), as base64 text for state.json."""

    def enc(t: torch.Tensor) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    state = {"torch": enc(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = enc(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict[str, str], device: torch.device, where: str = "state") -> None:
    """Restore `rng_state`'s output; BertforgeError naming `where` if torch refuses it."""

    def dec(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    try:
        torch.set_rng_state(dec(state["torch"]))
        if device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(dec(state["cuda"]), device)
    except (KeyError, TypeError, ValueError, RuntimeError):  # base64's errors are ValueErrors
        raise BertforgeError(
            f"{where}: rng is not a random generator state torch can restore"
        ) from None


# ------------------------------------------------------- gathering from the ranks


def gather_model_state(model: torch.nn.Module, dist: Distributed) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights on the CPU, as `model_state` gives them; a collective
    under FSDP (torch.distributed.checkpoint's full_state_dict)."""
    if dist.strategy != "fsdp":
        return model_state(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return cast(dict[str, torch.Tensor], full)


def gather_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: Distributed
) -> dict[str, Any]:
    """The optimizer's state_dict in plain single-process form (parameters numbered in
    optimizer order), on rank 0; a collective under FSDP."""
    if dist.strategy != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    full = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return _numbered(full) if dist.is_main else {}


def load_full_optimizer_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    dist: Distributed,
) -> None:
    """Load `gather_optimizer_state`'s output; under FSDP every rank takes its shards."""
    if dist.strategy != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(
        model,
        optimizer,
        _named(state, model, optimizer),
        options=StateDictOptions(full_state_dict=True),
    )


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the ids of a plain state_dict)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _numbered(named: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state_dict (torch.distributed.checkpoint's form) -> ids."""
    ids: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        params = [ids.setdefault(n, len(ids)) for n in group["params"]]
        groups.append(dict(group, params=params))
    return {"state": {ids[n]: s for n, s in named["state"].items()}, "param_groups": groups}


def _named(
    numbered: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The reverse of `_numbered`, for this model and optimizer."""
    names = _param_names(model, optimizer)
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in numbered["param_groups"]]
    return {
        "state": {names[int(i)]: s for i, s in numbered["state"].items()},
        "param_groups": groups,
    }


# ------------------------------------------------------------------------- the files


def _name(step: int) -> str:
    return f"{_PREFIX}{step:06d}"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint directory named step-NNNNNN; None for anything else."""
    digits = path.name[len(_PREFIX) :]
    return int(digits) if path.name.startswith(_PREFIX) and digits.isdigit() else None


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint directory, oldest first (by number, not by name)."""
    found = [(step_of(p), p) for p in ckpt_dir.glob(f"{_PREFIX}*") if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_digest(state: dict[str, Any]) -> str:
    """sha256 of state.json's content (without its own digest), canonically serialised."""
    rest = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write checkpoint `path`'s state.json (atomically), sealed with its own sha256.

    `state["checksums"]` must already hold the sha256 of each file it names.
    """
    state = dict(state, state_sha256=_state_digest(state))
    write_text_atomic(path / STATE_FILE, json.dumps(state, indent=1))


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write checkpoints/step-NNNNNN atomically, point `latest` at it, prune old ones.

    `weights` is `model_state(model)` (or the same gathered from shards); `optimizer_state`
    an optimizer's state_dict.

    Weights that are not finite are refused (BertforgeError) before anything is written.
    On a failed write (a full disk, say) nothing that was complete before is touched: the
    partial checkpoint is removed and BertforgeError raised.
    """
    name = _name(step)
    final = ckpt_dir / name
    tmp = ckpt_dir / f".{name}.tmp"
    require_finite(weights, f"not saving checkpoint {name}")
    try:
        make_dir(ckpt_dir)
        remove_partial(ckpt_dir)
        tmp.mkdir()
        save_file(weights, str(tmp / MODEL_FILE))
        give_usual_mode(tmp / MODEL_FILE)  # safetensors leaves its private 0600
        files = [MODEL_FILE]
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
            files.append(OPTIMIZER_FILE)
        for f in files:
            fsync(tmp / f)
        write_state(tmp, dict(state, step=step, checksums={f: _sha256(tmp / f) for f in files}))
        if final.exists():  # this step from an abandoned attempt (newer than the resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(ckpt_dir)
        write_text_atomic(ckpt_dir / "latest", name + "\n")
    # safetensors and torch.save report a failed write as errors of their own
    except (OSError, SafetensorError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BertforgeError(
            f"could not write checkpoint {final}: {_write_error(e)}; "
            f"the previous checkpoint is untouched"
        ) from None
    _prune(ckpt_dir, keep_last, step)
    return final


def remove_partial(ckpt_dir: Path) -> None:
    """Remove the partial checkpoints (hidden .tmp directories) a run killed mid-save left."""
    for stale in ckpt_dir.glob(f".{_PREFIX}*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _write_error(e: Exception) -> str:
    """Why a write failed, in a few words: 'No space left on device'."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    code = re.search(r"os error (\d+)", str(e))  # safetensors: "...(os error 28)"
    if code:
        return os.strerror(int(code.group(1)))
    # torch.save: "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return "write failed (" + re.sub(r"^\[enforce fail at [^]]*\]\s*\.?\s*", "", first) + ")"


def _prune(ckpt_dir: Path, keep_last: int, step: int) -> None:
    """Keep the newest `keep_last` complete checkpoints up to `step` (the one just written).

    Newer ones belong to an attempt that was abandoned (a resume fell back past them);
    they are left alone, and overwritten as the run reaches their steps again.
    """
    done = [p for s, p in _checkpoints(ckpt_dir) if s <= step and (p / STATE_FILE).exists()]
    for old in done[:-keep_last]:
        if step_of(old) != step:
            shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> dict[str, Any]:
    """The state.json of a complete, uncorrupted checkpoint; BertforgeError otherwise."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        raise BertforgeError(
            f"{path / STATE_FILE}: missing or unreadable (truncated or corrupted)"
        ) from None
    checksums = state.get("checksums") if isinstance(state, dict) else None
    sealed = state.get("state_sha256") if isinstance(state, dict) else None
    if (
        not isinstance(checksums, dict)
        or MODEL_FILE not in checksums
        or sealed != _state_digest(state)
    ):
        raise BertforgeError(f"{path / STATE_FILE}: checksum mismatch (corrupted)")
    step, named = state.get("step"), step_of(path)
    if (
        not isinstance(step, int)
        or isinstance(step, bool)
        or step < 0
        or (named is not None and step != named)
    ):
        raise BertforgeError(
            f"{path / STATE_FILE}: step {short(repr(step))} is not the checkpoint's ({path.name})"
        )
    for f, digest in checksums.items():
        if not (path / f).is_file():
            raise BertforgeError(f"{path / f}: missing")
        if _sha256(path / f) != digest:
            raise BertforgeError(f"{path / f}: checksum mismatch (truncated or corrupted)")
    return state


def any_checkpoint(ckpt_dir: Path) -> bool:
    """Whether `ckpt_dir` holds any checkpoint directory, complete or not."""
    return ckpt_dir.is_dir() and bool(_checkpoints(ckpt_dir))


def find_latest(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, falling back past corrupted ones.

    Only complete checkpoints are candidates (a partial one is a hidden .tmp directory),
    so this is `latest` unless that one is corrupted or a kill came just after a rename.
    """
    if not ckpt_dir.is_dir():
        return None
    for _, path in reversed(_checkpoints(ckpt_dir)):
        try:
            return path, verify(path)
        except BertforgeError as e:
            print(f"warning: skipping checkpoint: {e}", file=sys.stderr)
    return None


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path / MODEL_FILE)


def load_optimizer_state(path: Path) -> dict[str, Any]:
    """The optimizer state; refused if unpickling needs anything but tensors and plain
    containers (`load_pickled`)."""
    return load_pickled(path / OPTIMIZER_FILE)
