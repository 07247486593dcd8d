"""The GLUE tasks: their TSV layouts, labels and official metrics, and the suite runner.

Files are read as GLUE distributes them. Columns are found by name when the file has a
header row (every task but CoLA); otherwise by position, as in the official layouts
(`Column.index`, negative from the end). A task's headline score is the mean of its
official metrics (accuracy and F1 for MRPC and QQP, Pearson and Spearman for STS-B),
averaged over MNLI's matched and mismatched dev sets; the suite's average is the mean
of the tasks' scores, as on the GLUE leaderboard.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertforge.data.labelled import Examples, TaskData, encode_labels, rows_tsv
from bertforge.data.readers import quote
from bertforge.errors import BertforgeError
from bertforge.fileio import write_text_atomic
from bertforge.paths import make_marked


@dataclass(frozen=True)
class Column:
    name: str  # in the header row
    index: int  # in a file without one (negative: from the end)


@dataclass(frozen=True)
class GlueTask:
    name: str
    directory: str  # as in the GLUE download
    text: Column
    pair: Column | None
    label: Column
    labels: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    dev: tuple[tuple[str, str], ...] = (("", "dev.tsv"),)  # (split name, file)
    scores: tuple[float, float] | None = None  # a regression task's range of targets


_BINARY = ("0", "1")
# What the 0/1 of the binary tasks mean: the names a fine-tuned model's predictions carry.
LABEL_NAMES = {
    "cola": ("unacceptable", "acceptable"),
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "qqp": ("not_duplicate", "duplicate"),
}
_NLI = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask(
            "cola", "CoLA", Column("sentence", 3), None, Column("label", 1), _BINARY, ("matthews",)
        ),
        GlueTask(
            "sst2", "SST-2", Column("sentence", 0), None, Column("label", 1), _BINARY, ("accuracy",)
        ),
        GlueTask(
            "mrpc",
            "MRPC",
            Column("#1 String", 3),
            Column("#2 String", 4),
            Column("Quality", 0),
            _BINARY,
            ("accuracy", "f1"),
        ),
        GlueTask(
            "qqp",
            "QQP",
            Column("question1", 3),
            Column("question2", 4),
            Column("is_duplicate", 5),
            _BINARY,
            ("accuracy", "f1"),
        ),
        GlueTask(
            "stsb",
            "STS-B",
            Column("sentence1", 7),
            Column("sentence2", 8),
            Column("score", -1),
            None,
            ("pearson", "spearman"),
            scores=(0.0, 5.0),
        ),
        GlueTask(
            "mnli",
            "MNLI",
            Column("sentence1", 8),
            Column("sentence2", 9),
            Column("gold_label", -1),
            ("contradiction", "entailment", "neutral"),
            ("accuracy",),
            dev=(("matched", "dev_matched.tsv"), ("mismatched", "dev_mismatched.tsv")),
        ),
        GlueTask(
            "qnli",
            "QNLI",
            Column("question", 1),
            Column("sentence", 2),
            Column("label", -1),
            _NLI,
            ("accuracy",),
        ),
        GlueTask(
            "rte",
            "RTE",
            Column("sentence1", 1),
            Column("sentence2", 2),
            Column("label", -1),
            _NLI,
            ("accuracy",),
        ),
        GlueTask(
            "wnli",
            "WNLI",
            Column("sentence1", 1),
            Column("sentence2", 2),
            Column("label", -1),
            _BINARY,
            ("accuracy",),
        ),
    ]
}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def glue_task(name: str) -> GlueTask:
    """The task named `name` ('sst2', 'SST-2', 'sts-b', ...)."""
    found = GLUE_TASKS.get(_key(name))
    if found is None:
        raise BertforgeError(f"unknown GLUE task {name!r}; choose one of {', '.join(GLUE_TASKS)}")
    return found


def task_dir(task: GlueTask, data_dir: Path) -> Path | None:
    """DIR itself if it holds the task's train.tsv, else DIR/<SST-2 or sst2 or ...>."""
    data_dir = Path(data_dir)
    if (data_dir / "train.tsv").is_file():
        return data_dir
    if data_dir.is_dir():
        for child in sorted(data_dir.iterdir()):
            if _key(child.name) == task.name and (child / "train.tsv").is_file():
                return child
    return None


def present_tasks(data_dir: Path) -> list[str]:
    """The GLUE tasks with a directory and a train.tsv under `data_dir`, in GLUE order."""
    return [
        name
        for name, task in GLUE_TASKS.items()
        if Path(data_dir).is_dir()
        and not (Path(data_dir) / "train.tsv").is_file()
        and task_dir(task, data_dir) is not None
    ]


def read_split(task: GlueTask, path: Path) -> Examples:
    """One GLUE TSV file: by header names when it has a header row, else by position."""
    rows = rows_tsv(path)
    first = next(rows, None)
    if first is None:
        raise BertforgeError(f"{path}: empty file (no examples)")
    columns = [task.text, task.label] + ([task.pair] if task.pair else [])
    header = [h.strip() for h in first[1]]
    if all(c.name in header for c in columns):
        index, width, why = [header.index(c.name) for c in columns], len(header), "the header"
    else:  # no header: the first line is an example, and sets the width
        width, why = len(first[1]), f"line {first[0]}"
        need = max(c.index + 1 if c.index >= 0 else -c.index for c in columns)
        if width < need:
            raise BertforgeError(
                f"{path}, line {first[0]}: {width} field(s), but a "
                f"{task.name} file without a header has at least {need}"
            )
        index = [c.index % width for c in columns]
        rows = itertools.chain([first], rows)
    texts: list[str] = []
    pairs: list[str] | None = [] if task.pair else None
    labels: list[str] = []
    lines: list[int] = []
    for number, row in rows:
        if len(row) != width:
            raise BertforgeError(
                f"{path}, line {number}: {len(row)} fields, expected {width} (as {why} has)"
            )
        texts.append(row[index[0]].strip())
        labels.append(row[index[1]].strip())
        if pairs is not None:
            pairs.append(row[index[2]].strip())
        lines.append(number)
    if not texts:
        raise BertforgeError(f"{path}: no examples (only a header)")
    y = encode_labels(labels, lines, list(task.labels) if task.labels else None, path)
    check_layout(task, path, texts, pairs, y, lines)
    return Examples(path, texts, pairs, y, lines)


def check_layout(
    task: GlueTask, path: Path, texts: list[str], pairs: list[str] | None, y: Any, lines: list[int]
) -> None:
    """Refuse values the task's layout cannot have: what another task's file read by this
    task's column positions gives (CoLA's files under SST-2/ give its source code,
    'gj04', as every sentence). Labels are checked against the task's by encode_labels."""
    for column, values in ((task.text, texts), (task.pair, pairs)):
        # (a premise may repeat over a few examples, as MNLI's do)
        if column is not None and values is not None and len(values) >= 4 and len(set(values)) == 1:
            raise BertforgeError(
                f"{path}: every example's {column.name} is "
                f"{quote(values[0])}; this is not a {task.name} file (another "
                f"task's layout?)"
            )
    if task.scores is not None:
        low, high = task.scores
        for value, number in zip(y.tolist(), lines):
            if not low <= value <= high:
                raise BertforgeError(
                    f"{path}, line {number}: {task.label.name} "
                    f"{quote(repr(value))} is outside {task.name}'s range "
                    f"[{low:g}, {high:g}] (another task's layout?)"
                )


def load_glue_task(name: str, data_dir: Path) -> TaskData:
    """A GLUE task from DIR (the task's directory, or the GLUE root holding it)."""
    task = glue_task(name)
    where = task_dir(task, data_dir)
    if where is None:
        raise BertforgeError(
            f"no {task.name} data in {data_dir} (expected train.tsv there or "
            f"in {Path(data_dir) / task.directory})"
        )
    validation = {}
    for split, file in task.dev:
        if not (where / file).is_file():
            raise BertforgeError(f"{where}: no {file} (the {task.name} dev set)")
        validation[split] = read_split(task, where / file)
    return TaskData(
        name=task.name,
        train=read_split(task, where / "train.tsv"),
        validation=validation,
        labels=(list(LABEL_NAMES.get(task.name, task.labels)) if task.labels else None),
        metrics=task.metrics,
        score=task.metrics,
    )


def run_glue(
    model: Path,
    data_dir: Path,
    out_dir: Path,
    tasks: list[str] | None = None,
    cfg: Any = None,
    from_scratch: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune `model` on each task into OUT/<task>/; the results and their average."""
    from bertforge.commands.finetune import run_finetune
    from bertforge.train.tracking import check_available

    if cfg is not None:
        check_available(cfg.train)  # a missing tracker package, before any work
    names = [glue_task(t).name for t in tasks] if tasks else present_tasks(data_dir)
    if not names:
        raise BertforgeError(
            f"no GLUE task directories in {data_dir} (expected e.g. "
            f"{Path(data_dir) / 'SST-2' / 'train.tsv'})"
        )
    datasets = {name: load_glue_task(name, data_dir) for name in names}  # all errors first
    make_marked(Path(out_dir), "glue")  # before its tasks: a killed run's stays known
    results: dict[str, Any] = {}
    for name, data in datasets.items():
        summary = run_finetune(
            model,
            data,
            Path(out_dir) / name,
            cfg,
            from_scratch=from_scratch,
            show_progress=show_progress,
        )
        results[name] = {
            "score": summary["score"],
            "best_epoch": summary["best_epoch"],
            "metrics": summary["best"],
            "wall_time_s": summary["wall_time_s"],
        }
    average = sum(r["score"] for r in results.values()) / len(results)
    report = {
        "model": str(model),
        "from_scratch": from_scratch,
        "tasks": results,
        "average": average,
    }
    write_text_atomic(Path(out_dir) / "glue.json", json.dumps(report, indent=1) + "\n")
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """| Task | Metric | Score | rows, x100 as on the GLUE leaderboard, and the average."""
    lines = ["| Task | Metrics | Score |", "|---|---|---:|"]
    for name, r in report["tasks"].items():
        task = GLUE_TASKS.get(name)
        metric_names = task.metrics if task else ()
        shown = ", ".join(
            f"{k} {100 * v:.1f}"
            for k, v in r["metrics"].items()
            if any(k == m or k.startswith(m + "_") for m in metric_names)
        )
        lines.append(f"| {task.directory if task else name} | {shown} | {100 * r['score']:.1f} |")
    lines.append(f"| **Average** | | **{100 * report['average']:.1f}** |")
    return "\n".join(lines)
