"""Configuration: one small dataclass per concern, plus the named model presets.

`ModelConfig` uses the field names of `transformers.BertConfig`, so a config.json from the
Hugging Face world maps onto it one to one. Every config is validated on construction; a
bad value raises `BertforgeError` naming the field, and a numeric field's range is its
`rule`, checked for config files and flags alike (`number`). A run's resolved configs are
written to RUN_DIR/config.yaml and forced on resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from bertforge.errors import BertforgeError


def _help(text: str, metavar: str | None = None, rule: str | None = None, **kw: Any) -> Any:
    """A dataclass field whose help text (and metavar) the CLI shows; a number's `rule`
    (">= 1", "> 0", "[0, 1)", ...) is checked wherever a value comes from (`check_rules`,
    and the flag's parser, `number`)."""
    return field(metadata={"help": text, "metavar": metavar, "rule": rule}, **kw)


_RULE = re.compile(
    r"(?P<op>>=|>)\s*(?P<bound>\S+)"
    r"|(?P<open>[\[(])\s*(?P<lo>[^,\s]+)\s*,\s*(?P<hi>[^\])\s]+)\s*(?P<close>[\])])"
)


def satisfies(value: float, rule: str) -> bool:
    """Whether `value` is a finite number that meets `rule`: '>= 1', '> 0', '[0, 1)',
    '(0, 1]', '[0, 1]'."""
    m = _RULE.fullmatch(rule)
    if m is None:
        raise ValueError(f"malformed rule {rule!r}")
    if not math.isfinite(value):
        return False
    if m["op"]:
        bound = float(m["bound"])
        return value >= bound if m["op"] == ">=" else value > bound
    lo, hi = float(m["lo"]), float(m["hi"])
    return (lo <= value if m["open"] == "[" else lo < value) and (
        value <= hi if m["close"] == "]" else value < hi
    )


def rule_text(rule: str) -> str:
    """'must be >= 1', 'must be in [0, 1)': what a refusal says."""
    return f"must be {rule}" if rule[0] == ">" else f"must be in {rule}"


def number(
    kind: type, rule: str, parse: Callable[[str], Any] | None = None
) -> Callable[[str], Any]:
    """The argparse `type` of a numeric flag: the text as `kind` (or through `parse`),
    refused unless it is finite and meets `rule`. Every numeric flag of every command is
    parsed by one of these (tests/cli/test_flags.py checks that no flag is left out), so that
    `--batch-size -1` or `--lr nan` ends in one line, exit 2, before any work."""
    if not isinstance(rule, str) or _RULE.fullmatch(rule) is None:
        raise ValueError(f"a numeric flag needs a rule, got {rule!r}")

    def convert(text: str) -> Any:
        try:
            value = parse(text) if parse else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not satisfies(value, rule):
            why = rule_text(rule) if math.isfinite(value) else "must be a finite number"
            raise argparse.ArgumentTypeError(f"{_short(text, 40)}: {why}")
        return value

    convert.rule = rule  # type: ignore[attr-defined]
    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


def field_number(kind: type, name: str) -> Callable[[str], Any]:
    """`number` for field `name` of dataclass `kind`: its type and rule, so that a flag
    outside the dataclass (`prepare --seq-len`) keeps the field's rule."""
    f = next(f for f in fields(kind) if f.name == name)
    hint = typing.get_type_hints(kind)[name]
    base = next(a for a in (typing.get_args(hint) or (hint,)) if a is not type(None))
    return number(base, f.metadata["rule"])


@dataclass
class ModelConfig:
    """The BERT architecture (field names as in transformers.BertConfig)."""

    vocab_size: int = _help("Vocabulary size (the tokenizer's).", rule=">= 1", default=30522)
    hidden_size: int = _help("Width of the encoder.", rule=">= 1", default=768)
    num_hidden_layers: int = _help("Number of encoder layers.", rule=">= 1", default=12)
    num_attention_heads: int = _help("Attention heads per layer.", rule=">= 1", default=12)
    intermediate_size: int = _help("Width of the feed-forward layer.", rule=">= 1", default=3072)
    hidden_act: str = _help("Feed-forward activation (only 'gelu').", default="gelu")
    hidden_dropout_prob: float = _help(
        "Dropout on embeddings and sublayer outputs.", rule="[0, 1)", default=0.1
    )
    attention_probs_dropout_prob: float = _help(
        "Dropout on attention probabilities.", rule="[0, 1)", default=0.1
    )
    max_position_embeddings: int = _help(
        "Longest sequence the model can take.", rule=">= 1", default=512
    )
    type_vocab_size: int = _help("Number of segment (token type) ids.", rule=">= 1", default=2)
    initializer_range: float = _help(
        "Std of the normal weight initialisation.", rule="> 0", default=0.02
    )
    layer_norm_eps: float = _help("LayerNorm epsilon.", rule="> 0", default=1e-12)
    pad_token_id: int = _help("Id of [PAD].", rule=">= 0", default=0)

    def __post_init__(self) -> None:
        check_rules(self)
        _check(
            self,
            "hidden_size",
            self.hidden_size % self.num_attention_heads == 0,
            f"({self.hidden_size}) must be divisible by num_attention_heads "
            f"({self.num_attention_heads})",
        )
        _check(self, "hidden_act", self.hidden_act == "gelu", "must be 'gelu'")
        _check_fits(self)

    @property
    def padded_vocab_size(self) -> int:
        """Vocab rounded up to a multiple of 64 for fast matmuls; never exported."""
        return -(-self.vocab_size // 64) * 64

    @property
    def num_parameters(self) -> int:
        """The parameters of the BertForPreTraining this config builds (tied decoder once)."""
        V, H, F = self.padded_vocab_size, self.hidden_size, self.intermediate_size
        embeddings = (V + self.max_position_embeddings + self.type_vocab_size) * H + 2 * H
        # fused qkv and output projections, the feed-forward pair, their biases, 2 LayerNorms
        layer = 4 * H * H + 2 * H * F + 3 * H + H + F + H + 4 * H
        heads = (H * H + H) + (H * H + H + 2 * H + V) + (2 * H + 2)  # pooler, MLM, NSP
        return embeddings + self.num_hidden_layers * layer + heads


# More parameters than any BERT could sensibly have: refused even where the machine's
# memory cannot be read.
MAX_PARAMETERS = 10**12


def available_memory() -> int | None:
    """Bytes of memory available to this process: MemAvailable in /proc/meminfo (Linux),
    else the machine's physical memory (os.sysconf), else None (unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_fits(config: ModelConfig) -> None:
    """Refuse a model whose fp32 weights alone would not fit in memory, before anything
    allocates them: a config.json with a million layers would otherwise allocate until
    the machine runs out, one with hidden_size 10**9 ask for terabytes at once."""
    n = config.num_parameters
    need, have = 4 * n, available_memory()
    if n > MAX_PARAMETERS or (have is not None and need > have):
        room = (
            f"this machine has {have / 1e9:,.1f} GB of memory available"
            if have is not None and need > have
            else f"more than {MAX_PARAMETERS:,} parameters is no BERT"
        )
        raise BertforgeError(
            f"ModelConfig: {n:,} parameters (hidden_size {config.hidden_size}, "
            f"num_hidden_layers {config.num_hidden_layers}, intermediate_size "
            f"{config.intermediate_size}, vocab_size {config.vocab_size}) need "
            f"{need / 1e9:,.1f} GB for their fp32 weights alone; {room}"
        )


# layers, hidden, heads (Turc et al. 2019 sizes); intermediate is 4 x hidden.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a named size preset, with field overrides."""
    if name not in PRESETS:
        raise BertforgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    layers, hidden, heads = PRESETS[name]
    values: dict[str, Any] = dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
    )
    values.update(overrides)
    return ModelConfig(**values)


MASKINGS = ("token", "wwm", "span")
DEFAULT_WARMUP_FRACTION = 0.06
DEFAULT_MICRO_BATCH = 32  # on the CPU, or where the memory a GPU has free is not known
WARMUP_FIELDS = ("warmup_steps", "warmup_fraction")
OBJECTIVES = ("mlm", "mlm+nsp", "mlm+sop")
DOCUMENT_BOUNDARIES = ("cross", "new")


@dataclass
class DataConfig:
    """Where sequences come from, how they are built and how they are masked."""

    path: str | list[str] | None = _help(
        "The prepared data directory the run reads, or a list of them read as one dataset.",
        default=None,
    )
    seq_len: int = _help("Tokens per sequence, [CLS] and [SEP] included.", rule=">= 8", default=128)
    valid_fraction: float = _help(
        "Fraction of documents held out for evaluation.", rule="[0, 1)", default=0.01
    )
    mask_rate: float = _help(
        "Fraction of tokens selected for MLM prediction.", rule="(0, 1]", default=0.15
    )
    mask_token_ratio: float = _help(
        "Of the selected tokens, the fraction replaced by [MASK].", rule="[0, 1]", default=0.8
    )
    random_token_ratio: float = _help(
        "Of the selected tokens, the fraction replaced by a "
        "random token (the rest stay unchanged).",
        rule="[0, 1]",
        default=0.1,
    )
    masking: str = _help(
        "What is masked: 'token' (BERT), 'wwm' (whole words: a word's "
        "WordPiece pieces together) or 'span' (SpanBERT: whole-word spans of "
        "geometric length).",
        default="token",
    )
    span_p: float = _help(
        "Span masking: parameter p of the geometric span length.", rule="(0, 1]", default=0.2
    )
    span_max: int = _help("Span masking: longest span, in words.", rule=">= 1", default=10)
    objective: str = _help(
        "'mlm', 'mlm+nsp' (BERT's next-sentence prediction) or 'mlm+sop' "
        "(ALBERT's sentence-order prediction).",
        default="mlm",
    )
    document_boundary: str = _help(
        "Packing when data is prepared: 'cross' (documents joined "
        "by [SEP] across sequences) or 'new' (each document starts "
        "a new sequence).",
        default="cross",
    )
    tokenizer_hash: str | None = _help(
        "Fingerprint of the tokenizer the data was made with; "
        "recorded by the run and checked on resume.",
        default=None,
    )

    def __post_init__(self) -> None:
        check_rules(self)
        _check(
            self,
            "random_token_ratio",
            self.random_token_ratio <= 1.0 - self.mask_token_ratio,
            "must be in [0, 1 - mask_token_ratio]",
        )
        _check(self, "masking", self.masking in MASKINGS, f"must be one of {', '.join(MASKINGS)}")
        _check(
            self,
            "objective",
            self.objective in OBJECTIVES,
            f"must be one of {', '.join(OBJECTIVES)}",
        )
        _check(
            self,
            "document_boundary",
            self.document_boundary in DOCUMENT_BOUNDARIES,
            f"must be one of {', '.join(DOCUMENT_BOUNDARIES)}",
        )


@dataclass
class TrainConfig:
    """The optimisation and the run's schedule of evaluation, logging and checkpoints."""

    batch_size: int = _help(
        "Sequences per optimizer step (the global batch).", rule=">= 1", default=256
    )
    micro_batch_size: int | None = _help(
        "Sequences per forward/backward; the batch is "
        "accumulated from micro-batches. Default: on a GPU "
        "the whole per-process batch where it fits in "
        f"memory, else {DEFAULT_MICRO_BATCH}.",
        rule=">= 1",
        default=None,
    )
    lr: float = _help("Peak learning rate.", rule="> 0", default=1e-4)
    weight_decay: float = _help(
        "AdamW weight decay (not on biases and LayerNorm).", rule=">= 0", default=0.01
    )
    adam_beta1: float = _help("Adam beta1.", rule="[0, 1)", default=0.9)
    adam_beta2: float = _help("Adam beta2.", rule="[0, 1)", default=0.999)
    adam_eps: float = _help("Adam epsilon.", rule="> 0", default=1e-6)
    warmup_steps: int | None = _help(
        "Linear warmup over this many steps (instead of warmup_fraction).",
        rule=">= 0",
        default=None,
    )
    warmup_fraction: float | None = _help(
        "Linear warmup over this fraction of the run (of "
        "max_steps, or of the time budget); "
        f"{DEFAULT_WARMUP_FRACTION} when warmup_steps is "
        "not given either.",
        rule="[0, 1)",
        default=None,
    )
    schedule: str = _help(
        "Learning-rate decay after warmup: 'linear', 'cosine' or 'constant'.", default="linear"
    )
    max_steps: int | None = _help("Optimizer steps to run.", rule=">= 1", default=None)
    time_budget: float | None = _help(
        "Training-time budget (seconds, or 90s/30m/2h; evaluation "
        "and checkpoints are off the clock); the "
        "schedule reaches zero at the deadline.",
        metavar="DURATION",
        rule="> 0",
        default=None,
    )
    grad_clip: float = _help(
        "Clip the gradient norm to this (0 disables).", rule=">= 0", default=1.0
    )
    seed: int = _help("Seed for initialisation, data order and masks.", rule=">= 0", default=0)
    eval_every: int = _help(
        "Evaluate on held-out data every N steps (0: only at the end).", rule=">= 0", default=0
    )
    eval_sequences: int = _help(
        "Held-out sequences per evaluation (0: all).", rule=">= 0", default=2048
    )
    checkpoint_every: int = _help(
        "Save a checkpoint every N steps (0: only at the end).", rule=">= 0", default=0
    )
    keep_last: int = _help("Checkpoints to keep.", rule=">= 1", default=3)
    log_every: int = _help(
        "Write a train metrics line every N steps (and print progress).", rule=">= 1", default=10
    )
    precision: str = _help(
        "'auto' (bf16 where the hardware supports it), 'bf16' or 'fp32'.", default="auto"
    )
    device: str = _help("'auto', 'cpu', 'cuda' or 'cuda:N'.", default="auto")
    on_nan: str = _help(
        "On a non-finite loss or gradient: 'stop' (no checkpoint after the "
        "last good step) or 'skip' (drop that update, count it in metrics).",
        default="stop",
    )
    strategy: str = _help(
        "With several processes (torchrun): 'ddp' (replicated model) or "
        "'fsdp' (FSDP2, parameters sharded per encoder layer); 'auto' is "
        "ddp.",
        default="auto",
    )
    compile: bool | None = _help(
        "Run the forward pass and the loss through torch.compile: one fused graph, at the "
        "cost of a minute or more of compiling first. Default: on for GPU runs of at least "
        "1,000 steps or a 10-minute budget (with Triton installed), off on the CPU, where "
        "the compiled step measured no faster; --no-compile turns it off. Checkpoints keep "
        "plain parameter names.",
        default=None,
    )
    num_workers: int | None = _help(
        "Background processes that build (mask) the batches of "
        "the next steps while the current one computes; "
        "default: 2 on a GPU, 0 on the CPU.",
        rule=">= 0",
        default=None,
    )
    init: str | None = _help(
        "Start from this model instead of a random initialisation: a "
        "Hugging Face BERT directory, a bertforge run directory or one "
        "of its checkpoints. Its architecture and tokenizer come with it; "
        "heads it lacks start fresh.",
        metavar="MODEL",
        default=None,
    )
    tensorboard: bool = _help(
        "Also write the metrics as TensorBoard event files in "
        "RUN_DIR/tensorboard (needs bertforge[tensorboard]).",
        default=False,
    )
    wandb: str | None = _help(
        "Also log the metrics and the config to this Weights & Biases "
        "project (needs bertforge[wandb]; offline where WANDB_MODE=offline "
        "or there is no network).",
        metavar="PROJECT",
        default=None,
    )

    def __post_init__(self) -> None:
        check_rules(self)
        _check(
            self,
            "warmup_fraction",
            self.warmup_steps is None or self.warmup_fraction is None,
            "give warmup_steps or warmup_fraction, not both",
        )
        if self.warmup_steps is None and self.warmup_fraction is None:
            self.warmup_fraction = DEFAULT_WARMUP_FRACTION
        _check(
            self,
            "schedule",
            self.schedule in ("linear", "cosine", "constant"),
            "must be 'linear', 'cosine' or 'constant'",
        )
        # One rule for both forms: the warmup ends before the run does (a fraction says so
        # by being < 1; steps wherever the run's length in steps is known).
        _check(
            self,
            "warmup_steps",
            not (self.warmup_steps and self.max_steps) or self.warmup_steps < self.max_steps,
            f"must be fewer than max_steps ({self.max_steps}): the warmup must end "
            f"before the run does",
        )
        _check(
            self,
            "precision",
            self.precision in ("auto", "bf16", "fp32"),
            "must be 'auto', 'bf16' or 'fp32'",
        )
        _check(self, "on_nan", self.on_nan in ("stop", "skip"), "must be 'stop' or 'skip'")
        _check(
            self,
            "strategy",
            self.strategy in ("auto", "ddp", "fsdp"),
            "must be 'auto', 'ddp' or 'fsdp'",
        )

    @property
    def accumulation_steps(self) -> int:
        return -(-self.batch_size // (self.micro_batch_size or DEFAULT_MICRO_BATCH))

    @property
    def schedule_depends_on_length(self) -> bool:
        """Whether the learning rate at a given step depends on max_steps / time_budget
        (a decay to zero at the end, or a warmup given as a fraction of the run)."""
        return self.schedule != "constant" or bool(self.warmup_fraction)


def merge(into: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`into` updated with `values`, a later layer of config (preset < file < flags);
    a warmup given in one form replaces an earlier layer's other form."""
    if any(k in values for k in WARMUP_FIELDS):
        for k in WARMUP_FIELDS:
            into.pop(k, None)
    into.update(values)
    return into


@dataclass(frozen=True)
class RunConfig:
    """Everything a run was started with: what RUN_DIR/config.yaml holds. Frozen: a run's
    config is resolved once (bertforge.commands.resolve), each step making a new one."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> RunConfig:
        return cls(
            **{
                name: SECTIONS[name](**values)
                for name, values in typed_sections(raw, where).items()
            }
        )

    def save(self, path: Path) -> None:
        """Write atomically: a run killed mid-write must still be resumable."""
        from bertforge.fileio import write_text_atomic

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        return cls.from_dict(read_yaml(path), where=str(path))


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def typed_sections(raw: Any, where: str = "config") -> dict[str, dict[str, Any]]:
    """The model, data and train sections of a config mapping, each checked by `typed`
    (keys and types) but not yet built: a file that is layered over a preset is validated
    as a whole only once the preset is under it (its hidden_size against the preset's
    heads, say)."""
    if not isinstance(raw, dict):
        raise BertforgeError(f"{where}: expected a mapping with sections {', '.join(SECTIONS)}")
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise BertforgeError(
            f"{where}: unknown section {sorted(unknown)[0]!r} (expected {', '.join(SECTIONS)})"
        )
    return {
        name: typed(kind, raw.get(name) or {}, f"{where}: {name}")
        for name, kind in SECTIONS.items()
    }


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML config file as a mapping; BertforgeError if missing or malformed."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise BertforgeError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise BertforgeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return raw or {}


def build(kind: type, values: dict[str, Any], where: str) -> Any:
    """Build dataclass `kind` from a mapping, type-checking each value against the field's
    annotation (nested dataclasses from nested mappings)."""
    return kind(**typed(kind, values, where))


def typed(kind: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """`values` with every key a field of dataclass `kind` and every value coerced to the
    field's type; BertforgeError naming `where` if not.
    The rules across fields are `kind`'s own, applied when it is built."""
    if not isinstance(values, dict):
        raise BertforgeError(f"{where}: expected a mapping, got {type(values).__name__}")
    names = {f.name for f in fields(kind)}
    hints = typing.get_type_hints(kind)
    checked = {}
    for key, value in values.items():
        if key not in names:
            raise BertforgeError(f"{where}: unknown key {key!r}")
        checked[key] = coerce(value, hints[key], f"{where}.{key}")
    return checked


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def type_name(tp: Any) -> str:
    """'int', 'float | None', 'str | list[str]': an annotation as a user reads it."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (from YAML or JSON) as type `tp`, a field's resolved annotation; raises
    BertforgeError naming `where` when it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, where)
            except BertforgeError:
                continue
        raise BertforgeError(f"{where}: expected {type_name(tp)}, got {_short(value)}")
    if value is None:
        raise BertforgeError(f"{where}: must not be empty")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list) or not value:
            raise BertforgeError(
                f"{where}: expected a non-empty {type_name(tp)}, got {_short(value)}"
            )
        return [coerce(v, args[0], where) for v in value]
    if tp is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # PyYAML reads 1e-4 (no dot) as a string
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[tp](value)
    if not ok:
        raise BertforgeError(f"{where}: expected {type_name(tp)}, got {_short(value)}")
    return float(value) if tp is float else value


def _short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: an error line stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_rules(obj: Any) -> None:
    """Refuse NaN and infinity in any float field of dataclass `obj` (they pass range checks
    written as comparisons, inf > 0, and a first update at lr=inf writes NaN into every
    weight), and any number that breaks its field's rule (`_help`)."""
    for f in fields(obj):
        value, rule = getattr(obj, f.name), f.metadata.get("rule")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        _check(obj, f.name, math.isfinite(value), "must be a finite number")
        if rule:
            _check(obj, f.name, satisfies(value, rule), rule_text(rule))


def _check(obj: Any, name: str, ok: bool, message: str) -> None:
    if not ok:
        raise BertforgeError(f"{type(obj).__name__}.{name}={getattr(obj, name)!r}: {message}")
