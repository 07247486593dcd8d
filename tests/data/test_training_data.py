"""Training data means what the run thinks it means: a fine-tuning resume on other data,
another GLUE task's files under a task's folder, fractional labels without --regression
and a vocab.txt with a token on two lines are refused in one short line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import error_line, run_cli, write_sst2

from bertforge.commands.glue import GLUE_TASKS, load_glue_task
from bertforge.data.labelled import load_own_task
from bertforge.errors import BertforgeError

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------- resume on other data

FT = ["--max-steps", "1", "--max-length", "32", "--quiet"]


def _own(root: Path, flip: bool = False) -> list[object]:
    rows = "text,label\n" + "".join(
        f"the {w} sees the dog,{(i + flip) % 2}\n"
        for i, w in enumerate(["cat", "king", "bird", "ship"] * 4)
    )
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text(rows)
    (root / "valid.csv").write_text(rows)
    return ["--train", root / "train.csv", "--validation", root / "valid.csv"]


def _glue(root: Path, flip: bool = False) -> list[object]:
    write_sst2(root / "SST-2", train=8 + flip, dev=8)
    return ["--task", "sst2", "--data-dir", root]


@pytest.mark.parametrize("source", [_own, _glue], ids=["own files", "glue task"])
def test_a_resume_on_other_data_is_refused(tmp_path, capsys, one_step_run, source):
    data = source(tmp_path / "data")
    out = tmp_path / "ft"
    assert run_cli(capsys, "finetune", one_step_run, *data, *FT, "--out", out)[0] == 0
    source(tmp_path / "data", flip=True)  # the same file names, other content
    code, _, err = run_cli(capsys, "finetune", one_step_run, *data, *FT, "--out", out, "--resume")
    assert code == 2
    assert "--resume: the train data is not what" in error_line(err)
    source(tmp_path / "data")  # the run's own data again: resumes
    assert run_cli(capsys, "finetune", one_step_run, *data, *FT, "--out", out, "--resume")[0] == 0


# ---------------------------------------------------------- GLUE layouts and values


def _layout(name: str) -> tuple[str | None, list[list[str]]]:
    """(header or None, rows) of a few examples in task `name`'s layout as GLUE has it."""
    s = [
        "the cat sees the dog .",
        "a king finds the ship .",
        "the bird is dark .",
        "it sees a king .",
    ]
    two = ["0", "1", "1", "0"]
    nli = ["entailment", "not_entailment", "entailment", "not_entailment"]
    layouts = {
        "cola": (None, [["gj04", y, "", t] for t, y in zip(s, two)]),
        "sst2": ("sentence\tlabel", [[t, y] for t, y in zip(s, two)]),
        "mrpc": (
            "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
            [[y, str(i), str(i + 9), t, s[-1 - i]] for i, (t, y) in enumerate(zip(s, two))],
        ),
        "qqp": (
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            [[str(i), str(i), str(i + 9), t, s[-1 - i], y] for i, (t, y) in enumerate(zip(s, two))],
        ),
        "stsb": (
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
            "sentence2\tscore",
            [
                [str(i), "main", "x", "2012", str(i), "n", "n", t, s[-1 - i], f"{1.5 * i:.3f}"]
                for i, t in enumerate(s)
            ],
        ),
        "mnli": (
            "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\t"
            "label1\tgold_label",
            [
                [str(i), "1", "2", "g", "", "", "", "", t, s[-1 - i], y, y]
                for i, (t, y) in enumerate(
                    zip(s, ["neutral", "entailment", "contradiction", "neutral"])
                )
            ],
        ),
        "qnli": (
            "index\tquestion\tsentence\tlabel",
            [[str(i), t, s[-1 - i], y] for i, (t, y) in enumerate(zip(s, nli))],
        ),
        "rte": (
            "index\tsentence1\tsentence2\tlabel",
            [[str(i), t, s[-1 - i], y] for i, (t, y) in enumerate(zip(s, nli))],
        ),
        "wnli": (
            "index\tsentence1\tsentence2\tlabel",
            [[str(i), t, s[-1 - i], y] for i, (t, y) in enumerate(zip(s, two))],
        ),
    }
    return layouts[name]


def _write(folder: Path, task: str, layout: str) -> None:
    """Task `layout`'s examples, under the file names task `task` reads."""
    header, rows = _layout(layout)
    text = (header + "\n" if header else "") + "".join("\t".join(r) + "\n" for r in rows)
    folder.mkdir(parents=True, exist_ok=True)
    for file in ["train.tsv", *(f for _, f in GLUE_TASKS[task].dev)]:
        (folder / file).write_text(text)


@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_each_task_reads_its_own_layout(tmp_path, task):
    _write(tmp_path / GLUE_TASKS[task].directory, task, task)
    data = load_glue_task(task, tmp_path)
    assert len(data.train) == 4 and len(set(data.train.texts)) == 4


# Files whose header names every column a task reads are that task's, by name: SST-2's
# (sentence, label) are CoLA's columns too, so they read as CoLA with a header.
SAME_BY_NAME = {("cola", "sst2")}
PAIRS = [
    (task, other)
    for task in GLUE_TASKS
    for other in GLUE_TASKS
    if other != task and (task, other) not in SAME_BY_NAME
]


@pytest.mark.parametrize("task,other", PAIRS, ids=[f"{o}-under-{t}" for t, o in PAIRS])
def test_another_tasks_files_under_a_task_are_refused(tmp_path, task, other):
    _write(tmp_path / GLUE_TASKS[task].directory, task, other)
    with pytest.raises(BertforgeError) as e:
        load_glue_task(task, tmp_path)
    assert len(str(e.value)) < 300


def test_cola_files_under_sst2_are_refused_in_one_line(tmp_path, capsys, one_step_run):
    """The observed case: exit 0, every sentence the string 'gj04'."""
    _write(tmp_path / "glue" / "SST-2", "sst2", "cola")
    code, _, err = run_cli(
        capsys,
        "finetune",
        one_step_run,
        "--task",
        "sst2",
        "--data-dir",
        tmp_path / "glue",
        *FT,
        "--out",
        tmp_path / "ft",
    )
    assert code == 2
    assert "every example's sentence is gj04; this is not a sst2 file" in error_line(err)


# --------------------------------------------------------- labels and error lines


def _files(tmp_path: Path, train: list[str], dev: list[str]) -> tuple[Path, Path]:
    for name, labels in (("train", train), ("dev", dev)):
        (tmp_path / f"{name}.csv").write_text(
            "text,label\n" + "".join(f"the cat {i},{y}\n" for i, y in enumerate(labels))
        )
    return tmp_path / "train.csv", tmp_path / "dev.csv"


def test_fractional_labels_without_regression_are_refused_with_a_hint(tmp_path):
    scores = [f"{i * 0.0176:.4f}" for i in range(284)]
    train, dev = _files(tmp_path, scores, scores[:5])
    with pytest.raises(
        BertforgeError,
        match=r"train.csv, line 3: label 0.0176 is a fractional "
        r"number, not a class name; pass --regression",
    ):
        load_own_task(train, dev, "text", "label")
    assert load_own_task(train, dev, "text", "label", regression=True).regression


def test_an_unknown_label_line_is_short(tmp_path):
    train, dev = _files(tmp_path, [f"class{i}" for i in range(284)], ["x" * 5000])
    with pytest.raises(BertforgeError) as e:
        load_own_task(train, dev, "text", "label")
    message = str(e.value)
    assert "unknown label 'xxxx" in message and "(expected one of 284: class0, " in message
    assert len(message) - len(str(dev)) < 200  # the path is as long as the machine's tmp


# ------------------------------------------------------ a vocab.txt with a duplicate


def _duplicate_vocab(directory: Path) -> None:
    from bertforge.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(directory).get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda x: x[1])]
    for name in ("tokenizer.json", "vocab.txt"):
        (directory / name).unlink(missing_ok=True)
    (directory / "vocab.txt").write_text("\n".join([*tokens, tokens[7]]) + "\n")


def test_a_vocab_with_a_duplicate_line_is_refused_by_every_command(
    tmp_path, capsys, hf_dir, corpus_file, classification_files
):
    tok = tmp_path / "tok"
    shutil.copytree(hf_dir, tok)
    _duplicate_vocab(tok)
    commands = {
        "prepare": ["prepare", corpus_file, "--tokenizer", tok, "--out", tmp_path / "d"],
        "pretrain --tokenizer": [
            "pretrain",
            "--corpus",
            corpus_file,
            "--tokenizer",
            tok,
            "--out",
            tmp_path / "r",
            "--max-steps",
            "1",
            "--quiet",
        ],
        "pretrain --init": [
            "pretrain",
            "--init",
            tok,
            "--corpus",
            corpus_file,
            "--out",
            tmp_path / "i",
            "--max-steps",
            "1",
            "--quiet",
        ],
        "fill-mask": ["fill-mask", tok, "the [MASK] sees the dog"],
        "finetune": ["finetune", tok, *classification_files, "--out", tmp_path / "f"],
    }
    for name, argv in commands.items():
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, name
        line = error_line(err)
        assert "vocab.txt, line" in line and "is also on line 8" in line, (name, line)
        assert "replace line 8 by a placeholder" in line
