"""Where commands may write (bertforge.paths) and what they write through (fileio).

The rules are applied across every command with an output flag: each output pointed at
each input, at an input's parent, inside an input, at `/` and the home directory, at and
inside an artefact of another kind, and at a symbolic link, must be refused with exit
status 2 in one line, with nothing on disk changed. Refusals come before any work, so
the artefacts here are directories that look like bertforge's (a marker and a file or
two); the tests of planted links and of a kill during a replace run the real commands.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, write_corpus

from bertforge.paths import MARKER, Output, check_paths, kind_of

pytestmark = pytest.mark.report  # these tests read the reports runs write

ROOT = Path(__file__).resolve().parents[1]


def _artefact(path: Path, kind: str, *files: str) -> Path:
    path.mkdir(parents=True)
    (path / MARKER).write_text(json.dumps({"kind": kind}))
    for name in files:
        (path / name).write_text("{}\n")
    return path


@pytest.fixture
def world(tmp_path, monkeypatch) -> dict[str, Path]:
    """Inputs of every kind, and a home directory of its own."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    w = {
        "corpus": write_corpus(tmp_path / "corpus.txt", documents=4),
        "tokenizer": _artefact(tmp_path / "tok", "tokenizer", "tokenizer.json"),
        "data": _artefact(tmp_path / "data", "data", "manifest.json"),
        "run": _artefact(tmp_path / "run", "run", "config.yaml", "metrics.jsonl"),
        "export": _artefact(tmp_path / "export", "export", "config.json", "model.safetensors"),
        "finetune": _artefact(tmp_path / "ft", "finetune", "finetune.json"),
        "glue": tmp_path / "GLUE",
        "train": tmp_path / "train.csv",
        "valid": tmp_path / "valid.csv",
        "texts": tmp_path / "texts.txt",
    }
    (w["glue"] / "SST-2").mkdir(parents=True)
    (w["glue"] / "SST-2" / "train.tsv").write_text("sentence\tlabel\na\t0\n")
    for name in ("train", "valid"):
        w[name].write_text("text,label\na,0\nb,1\n")
    w["texts"].write_text("a\n")
    return w


# command -> (argv with {INPUT} names, {"--out flag": kind written there}); the inputs
# named are the paths the command reads.
COMMANDS = {
    "tokenizer": ("tokenizer {corpus} --out OUT", {"--out": "tokenizer"}),
    "prepare": ("prepare {corpus} --tokenizer {tokenizer} --out OUT", {"--out": "data"}),
    "pretrain --data": ("pretrain --data {data} --out OUT --max-steps 1", {"--out": "run"}),
    "pretrain --corpus": (
        "pretrain --corpus {corpus} --tokenizer {tokenizer} --out OUT --max-steps 1",
        {"--out": "run"},
    ),
    "pretrain --init": (
        "pretrain --data {data} --init {export} --out OUT --max-steps 1",
        {"--out": "run"},
    ),
    "evaluate": ("evaluate {run} --data {data} --out OUT", {"--out": "file"}),
    "export": ("export {run} --out OUT", {"--out": "export"}),
    "finetune own": (
        "finetune {export} --train {train} --validation {valid} --out OUT",
        {"--out": "finetune"},
    ),
    "finetune glue": (
        "finetune {export} --task sst2 --data-dir {glue} --out OUT",
        {"--out": "finetune"},
    ),
    "predict": ("predict {finetune} --input {texts} --output OUT", {"--output": "file"}),
    "glue --out": ("glue {export} --data-dir {glue} --out OUT", {"--out": "glue"}),
    "glue --results": (
        "glue {export} --data-dir {glue} --out {tmp}/new-glue --results OUT",
        {"--results": "file"},
    ),
    "report": ("report {run} --out OUT", {"--out": "report"}),
}


def _inputs(template: str) -> list[str]:
    return [
        name
        for name in (
            "corpus",
            "tokenizer",
            "data",
            "run",
            "export",
            "finetune",
            "glue",
            "train",
            "valid",
            "texts",
        )
        if "{" + name + "}" in template
    ]


def _targets(w: dict[str, Path], template: str, kind: str, tmp: Path) -> dict[str, Path]:
    """What each output is pointed at: every way it could overlap."""
    targets: dict[str, Path] = {"/": Path("/"), "home": tmp / "home"}
    for name in _inputs(template):
        if name == "run" and template.startswith("report"):
            continue  # a run's report goes inside it; its own test covers that
        targets[f"input {name}"] = w[name]
        targets[f"inside input {name}"] = w[name] / "sub"
        targets[f"parent of input {name}"] = w[name].parent
    for other in ("tokenizer", "data", "run", "export", "finetune"):
        if other != kind and not (kind == "report" and other in ("run", "finetune")):
            targets[f"a {other} directory"] = w[other]
            targets[f"inside a {other} directory"] = w[other] / "new"
    link = tmp / "link"
    if not link.exists():
        link.symlink_to(tmp / "nowhere")
    targets["a symbolic link"] = link
    return targets


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`, with its content's hash (links by their target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


CASES = [(command, flag) for command, (_, outs) in COMMANDS.items() for flag in outs]


@pytest.mark.parametrize("command,flag", CASES, ids=[f"{c} {f}" for c, f in CASES])
def test_every_output_that_overlaps_is_refused_before_any_work(
    command, flag, world, tmp_path, capsys
):
    template, outs = COMMANDS[command]
    targets = _targets(world, template, outs[flag], tmp_path)
    before = _snapshot(tmp_path)
    for what, target in targets.items():
        argv = template.format(**world, tmp=tmp_path).split()
        argv[argv.index("OUT")] = str(target)
        code, _out, err = run_cli(capsys, *argv)
        assert code == 2, f"{command} {flag} at {what}: exit {code}\n{err}"
        assert len(err.strip().splitlines()) == 1 and flag in err, (what, err)
        assert _snapshot(tmp_path) == before, f"{command} {flag} at {what} changed files"


def test_observed_cases(world, tmp_path, capsys, monkeypatch):
    # prepare DATA --out DATA; pretrain --data D --out D; export --out . over a config.json
    data = world["data"]
    code, _, err = run_cli(
        capsys, "prepare", data, "--tokenizer", world["tokenizer"], "--out", data
    )
    assert code == 2 and "is the input corpus" in err
    code, _, err = run_cli(capsys, "pretrain", "--data", data, "--out", data, "--max-steps", 1)
    assert code == 2 and "is the input --data" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": 1}')
    monkeypatch.chdir(mine)
    code, _, err = run_cli(capsys, "export", world["run"], "--out", ".")
    assert code == 2 and "files bertforge did not write" in err
    assert (mine / "config.json").read_text() == '{"mine": 1}'


def test_a_report_goes_inside_its_run_but_not_over_its_record(world, capsys):
    run = world["run"]
    for out in (run, run / "metrics.jsonl"):
        code, _, err = run_cli(capsys, "report", run, "--out", out)
        assert code == 2 and "metrics.jsonl" in err, err
    check_paths(
        [("run_dir", run / "metrics.jsonl")],
        [Output("--out", run / "report", "report", home=("run", "finetune"))],
    )


def test_kinds_are_known_by_marker_or_layout(tmp_path, world):
    assert {k: kind_of(world[k]) for k in ("tokenizer", "data", "run", "export")} == {
        "tokenizer": "tokenizer",
        "data": "data",
        "run": "run",
        "export": "export",
    }
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "manifest.json").write_text("{}")
    assert kind_of(legacy) == "data"  # an earlier bertforge's, unmarked
    (tmp_path / "config.yaml").write_text("a: 1\n")  # a config file beside is no run
    assert kind_of(tmp_path) is None


# ---------------------------------------------------------------- real runs: links, kills


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A corpus, its tokenizer and data, a 2-step tiny run and its export."""
    from bertforge.cli.main import main

    root = tmp_path_factory.mktemp("tiny")
    corpus = write_corpus(root / "c.txt", documents=60)
    args = (
        "--preset tiny --max-steps 2 --batch-size 8 --seq-len 32 --hidden-size 32 "
        "--intermediate-size 64 --schedule constant --warmup-steps 1 --quiet"
    ).split()  # a run that a resume may lengthen
    assert (
        main(
            ["tokenizer", str(corpus), "--out", str(root / "tok"), "--vocab-size", "150", "--quiet"]
        )
        == 0
    )
    assert (
        main(
            [
                "prepare",
                str(corpus),
                "--tokenizer",
                str(root / "tok"),
                "--out",
                str(root / "data"),
                "--seq-len",
                "32",
                "--quiet",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert main(["pretrain", "--data", str(root / "data"), "--out", str(root / "run"), *args]) == 0
    return {
        "root": root,
        "corpus": corpus,
        "tok": root / "tok",
        "data": root / "data",
        "run": root / "run",
        "args": args,
    }  # type: ignore[dict-item]


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    return victim


# (name, where the link goes, the command); each writes at the linked path.
LINKS = [
    ("run lock", "new/.lock", "pretrain --data {data} --out {tmp}/new {args}"),
    ("run lock on resume", "run/.lock", "pretrain --resume --out {tmp}/run --max-steps 3 --quiet"),
    (
        "prepare lock",
        ".new.lock",
        "prepare {corpus} --tokenizer {tok} --out {tmp}/new --seq-len 32 --quiet",
    ),
    (
        "metrics.jsonl",
        "run/metrics.jsonl",
        "pretrain --resume --out {tmp}/run --max-steps 3 --quiet",
    ),
    (
        "checkpoint directory",
        "run/checkpoints",
        "pretrain --resume --out {tmp}/run --max-steps 3 --quiet",
    ),
    (
        "tokenizer --out",
        "tok-link",
        "tokenizer {corpus} --out {tmp}/tok-link --vocab-size 150 --quiet",
    ),
    (
        "prepare --out",
        "data-link",
        "prepare {corpus} --tokenizer {tok} --out {tmp}/data-link --quiet",
    ),
    ("pretrain --out", "run-link", "pretrain --data {data} --out {tmp}/run-link {args}"),
    ("evaluate --out", "eval.json", "evaluate {tmp}/run --out {tmp}/eval.json"),
    ("export --out", "hf-link", "export {tmp}/run --out {tmp}/hf-link"),
    ("a run's export", "run/hf", "pretrain --resume --out {tmp}/run --max-steps 3 --quiet"),
    ("report --out", "run/report", "report {tmp}/run"),
    (
        "predict --output",
        "pred.jsonl",
        "predict {tmp}/run --input {corpus} --output {tmp}/pred.jsonl",
    ),
    (
        "glue --results",
        "results.json",
        "glue {tmp}/run/hf --data-dir {root} --out {tmp}/g --results {tmp}/results.json",
    ),
]


@pytest.mark.parametrize("name,where,command", LINKS, ids=[x[0] for x in LINKS])
def test_a_planted_link_is_refused_and_its_target_untouched(
    name, where, command, tiny, tmp_path, capsys
):
    import shutil

    shutil.copytree(tiny["run"], tmp_path / "run", symlinks=True)
    victim = _victim(tmp_path)
    link = tmp_path / where
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    elif os.path.lexists(link):
        link.unlink()
    link.symlink_to(victim)
    argv = command.format(**{**tiny, "args": " ".join(tiny["args"]), "tmp": tmp_path}).split()
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("bertforge: error")]
    assert len(errors) == 1 and "symbolic link" in errors[0], err
    assert victim.read_text() == "precious\n"
    assert link.is_symlink()


def test_atomic_writes_refuse_a_planted_temporary_file(tmp_path):
    from bertforge.errors import BertforgeError
    from bertforge.fileio import temporary_path, write_text_atomic

    victim = _victim(tmp_path)
    temporary_path(tmp_path / "config.yaml").symlink_to(victim)
    with pytest.raises(BertforgeError, match="symbolic link"):
        write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
    assert victim.read_text() == "precious\n"


def test_a_run_keeps_the_users_own_data_and_report(tiny, tmp_path, capsys):
    """pretrain --corpus rebuilds only the data and report it wrote."""
    import shutil

    run = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--corpus",
        tiny["corpus"],
        "--out",
        run,
        "--vocab-size",
        150,
        *tiny["args"],
    )
    assert code == 0, err
    shutil.rmtree(run / "checkpoints")  # a run with no checkpoint rebuilds stale data
    mine = run / "data"
    shutil.rmtree(mine)
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--corpus",
        tiny["corpus"],
        "--out",
        run,
        "--vocab-size",
        150,
        *tiny["args"],
    )
    assert code == 2 and "not a data directory bertforge wrote" in err, err
    assert (mine / "notes.txt").read_text() == "mine\n"
    shutil.rmtree(run / "report")
    (run / "report").mkdir()
    (run / "report" / "report.md").write_text("my notes\n")
    code, _, err = run_cli(capsys, "report", run)
    assert code == 2 and "did not write" in err, err
    assert (run / "report" / "report.md").read_text() == "my notes\n"


_KILL = """
import os, sys
from bertforge import fileio
point = sys.argv[1]
real_exchange = fileio._exchange
def exchange(a, b):
    if point == "before the swap":
        os._exit(137)
    if point == "between the renames":
        return False
    done = real_exchange(a, b)
    os._exit(137)
fileio._exchange = exchange
fileio._between_renames = lambda: os._exit(137)
from bertforge.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _export_files(d: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.iterdir())
        if p.is_file() and p.name != MARKER
    }


@pytest.mark.parametrize("point", ["before the swap", "after the swap", "between the renames"])
def test_a_kill_during_an_export_over_another_leaves_one_whole(point, tiny, tmp_path, capsys):
    """kill -9 (os._exit) injected at each step of the replace: the export directory is
    the old one or the new one, every file of it, never a mix."""
    import shutil

    other = tmp_path / "other"
    code, _, err = run_cli(
        capsys,
        "pretrain",
        "--data",
        tiny["data"],
        "--out",
        other,
        *tiny["args"][:2],
        "--max-steps",
        3,
        *tiny["args"][4:],
    )
    assert code == 0, err
    out = tmp_path / "hf"
    shutil.copytree(tiny["run"] / "hf", out)
    old, new = _export_files(out), _export_files(other / "hf")
    assert old["model.safetensors"] != new["model.safetensors"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", _KILL, point, "export", str(other), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 137, done.stderr
    if point == "between the renames":  # the next command puts the old one back first
        assert not out.exists()
        code, _, err = run_cli(capsys, "export", other, "--out", out)
        assert code == 0, err
        assert _export_files(out) == new
        return
    assert _export_files(out) == (old if point == "before the swap" else new)
    code, _, err = run_cli(capsys, "export", other, "--out", out)  # and a rerun completes
    assert code == 0, err
    assert _export_files(out) == new
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")] == []  # no litter
