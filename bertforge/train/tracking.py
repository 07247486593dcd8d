"""Experiment tracking: TensorBoard event files and Weights & Biases runs, on request.

Each tracker gets every numeric value of every metrics.jsonl record, as `train/<key>` or
`eval/<key>` against the record's step. Both packages are optional extras, imported only
when a run asks for them (`check_available` names the extra to install), and only the main
process opens trackers (the caller sees to that). A resumed run continues the same
TensorBoard directory and the same W&B run, without duplicating steps, and W&B never
prompts for an API key: docs/training.md#experiment-tracking.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import socket
import string
import sys
import threading
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from bertforge.config import TrainConfig
from bertforge.errors import BertforgeError
from bertforge.fileio import open_new, refuse_link, temporary_path
from bertforge.rundir import METRICS

TENSORBOARD_DIR = "tensorboard"
WANDB_STATE = "wandb-run.json"
WANDB_SERVER = "https://api.wandb.ai"
NETWORK_TIMEOUT_S = 2.0


def check_available(cfg: TrainConfig) -> None:
    """Fail at once, in one line naming the extra, where a requested package is missing,
    rather than after the data is prepared; imports nothing the run does not ask for."""
    if cfg.tensorboard:
        _require("torch.utils.tensorboard", "--tensorboard", "tensorboard")
    if cfg.wandb:
        _require("wandb", "--wandb", "wandb")
        check_project(cfg.wandb)


# What W&B refuses in a project name (wandb_settings' project validator).
_PROJECT_MAX, _PROJECT_BAD = 128, "/\\#?%:"


def check_project(name: str) -> None:
    """Refuse a W&B project name W&B would refuse, before the run directory is made."""
    bad = sorted({c for c in name if c in _PROJECT_BAD})
    if not name.strip() or len(name) > _PROJECT_MAX or bad:
        why = (
            f"it has {' '.join(bad)}"
            if bad
            else "it is empty"
            if not name.strip()
            else f"it is longer than {_PROJECT_MAX} characters"
        )
        raise BertforgeError(
            f"--wandb {name[:40]!r}: W&B refuses this project name ({why}; "
            f"none of {' '.join(_PROJECT_BAD)} may appear)"
        )


def _require(module: str, flag: str, extra: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise BertforgeError(
            f"{flag} needs the {extra} package: pip install 'bertforge[{extra}]'"
        ) from None


def open_trackers(
    run_dir: Path, cfg: TrainConfig, run_config: dict[str, Any] | None, name: str
) -> Trackers | None:
    """The trackers `cfg` asks for, as one object with log(record) and close(); None when
    it asks for none.

    Called after RunLog has cut metrics.jsonl back to the resumed step: its last line tells
    a resumed run (the step it continues after) from a fresh one (an empty file).
    """
    if not cfg.tensorboard and not cfg.wandb:
        return None
    check_available(cfg)
    run_dir = Path(run_dir)
    resumed_after = _last_step(run_dir / METRICS)
    trackers = Trackers()
    try:
        if cfg.tensorboard:
            trackers.sinks.append(_TensorBoard(run_dir / TENSORBOARD_DIR, resumed_after))
        if cfg.wandb:
            sink = _open_wandb(run_dir, cfg.wandb, run_config, name, resumed_after)
            if sink is not None:
                trackers.sinks.append(sink)
    except BaseException:
        trackers.close(failed=True)
        raise
    return trackers


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: {"train/loss": 2.3, ...}."""
    kind = record.get("kind", "train")
    return {
        f"{kind}/{k}": float(v)
        for k, v in record.items()
        if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Trackers:
    """Fans each record out to the open trackers; close() may be called more than once."""

    def __init__(self) -> None:
        self.sinks: list[_TensorBoard | _WandB] = []

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            # An evaluation is rare and worth seeing at once; train lines are batched.
            for sink in self.sinks:
                sink.log(record["step"], values, flush=record.get("kind") == "eval")

    def close(self, failed: bool = False) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(failed)


def _last_step(metrics: Path) -> int | None:
    """The step of metrics.jsonl's last line; None for an empty or missing file."""
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return int(json.loads(lines[-1])["step"]) if lines else None


class _TensorBoard:
    """Event files read by TensorBoard (torch's writer; it needs the tensorboard package)."""

    def __init__(self, log_dir: Path, resumed_after: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step makes TensorBoard drop the events earlier files hold from that step on:
        # a killed attempt's steps past the checkpoint this run resumes from (all of them on
        # a fresh start), which this run logs again.
        purge = 0 if resumed_after is None else resumed_after + 1
        self.writer = SummaryWriter(str(log_dir), purge_step=purge)

    def log(self, step: int, values: dict[str, float], flush: bool) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        if flush:
            self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class _WandB:
    """One W&B run; it sends what it is given as it comes, so `flush` changes nothing."""

    def __init__(self, run: Any, state_path: Path, state: dict[str, Any]):
        self.run, self.state_path, self.state = run, state_path, state
        # W&B's steps only go forward (it warns about and drops a step below the last one):
        # after a resume, the steps up to the last one the earlier attempt logged are in the
        # run already, so they are skipped.
        self.logged_before = state["step"]

    def log(self, step: int, values: dict[str, float], flush: bool) -> None:
        if step <= self.logged_before:
            return
        self.run.log(values, step=step)
        if step > self.state["step"]:
            self.state["step"] = step
            _write_state(self.state_path, self.state)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _open_wandb(
    run_dir: Path,
    project: str,
    run_config: dict[str, Any] | None,
    name: str,
    resumed_after: int | None,
) -> _WandB | None:
    """Start (or on resume continue) the run's W&B run; None where WANDB_MODE=disabled."""
    import wandb

    # wandb.init would hand an active run back instead of starting this one (and login does
    # nothing while one is active). bertforge closes its own runs, errors included.
    if wandb.run is not None:
        raise BertforgeError(
            "--wandb: a W&B run is already active in this process; finish it (run.finish()) first"
        )
    mode, why = _wandb_mode(wandb)
    if mode == "disabled":
        return None
    state_path = run_dir / WANDB_STATE
    state = _read_state(state_path) if resumed_after is not None else None
    if state is None:
        state = {"id": _new_run_id(), "step": 0}
        _write_state(state_path, state)
    try:
        run = wandb.init(
            project=project,
            dir=str(run_dir),
            config=run_config,
            name=run_dir.resolve().name,
            job_type=name,
            id=state["id"],
            resume="allow",
            mode=mode,
            settings=wandb.Settings(silent=True, console="off"),
        )
    except Exception as e:  # wandb's errors have no common base across versions
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "" if mode == "offline" else "; WANDB_MODE=offline logs it offline"
        raise BertforgeError(f"--wandb: W&B could not start the run: {first_line}{hint}") from e
    if mode == "offline":
        sync_dir = Path(run.dir).parent
        print(
            f"W&B: logging offline ({why}); upload the run later with: wandb sync {sync_dir}",
            file=sys.stderr,
            flush=True,
        )
    return _WandB(run, state_path, state)


def _wandb_mode(wandb: Any) -> tuple[Literal["online", "offline", "disabled"], str]:
    """(mode for wandb.init, why it is offline), checked quickly so that W&B neither
    prompts for an API key nor waits out its own timeouts on a machine without network."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env == "disabled":
        return "disabled", ""
    if env in ("offline", "dryrun"):
        return "offline", f"WANDB_MODE={env}"
    url = urlsplit(os.environ.get("WANDB_BASE_URL", WANDB_SERVER))
    host = url.hostname or ""
    port = url.port or (80 if url.scheme == "http" else 443)
    if not _reachable(host, port):
        return "offline", f"{host} cannot be reached"
    if not _has_credentials(wandb):
        return "offline", "no W&B API key (run `wandb login` or set WANDB_API_KEY)"
    return "online", ""


def _reachable(host: str, port: int, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds. The attempt
    runs in a thread because the socket timeout does not bound the DNS lookup."""
    opened: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:  # a failed DNS lookup too (socket.gaierror)
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def _has_credentials(wandb: Any) -> bool:
    """Whether W&B has an API key (or identity token) without asking for one: wandb.init
    would prompt on a terminal and fail without one."""
    try:
        return bool(wandb.login(prompt=False, verify=False))
    except TypeError:  # older wandb has no `prompt`; its api_key reads the same places
        return bool(wandb.api.api_key)


def _new_run_id() -> str:
    """An id in W&B's own style: 8 lowercase letters and digits."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _read_state(path: Path) -> dict[str, Any] | None:
    """wandb-run.json ({"id", "step": the last step logged}); None if missing or damaged,
    and the run then starts a new W&B run."""
    try:
        state = json.loads(path.read_text())
        return {"id": str(state["id"]), "step": int(state["step"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomic but not fsynced (it is written at every logged step): a state lost in a
    power cut only makes a resumed run send steps again, which W&B then drops."""
    refuse_link(path)
    tmp = temporary_path(path)
    os.close(open_new(tmp))  # never through a planted link
    tmp.write_text(json.dumps(state) + "\n")
    os.replace(tmp, path)
