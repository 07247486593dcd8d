"""Hostile data and bad luck while preparing it: each case ends in one short line and
exit status 2 (or a clean run), never a traceback, a hang, or files lost or left behind.

"Sealed" tampering recomputes the manifest's shard checksums afterwards, as anyone who
can write the data directory could: what it changes must be caught by what the ids say.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_cli, write_corpus

from bertforge.cli.main import main
from bertforge.data.loader import verify_data
from bertforge.errors import BertforgeError


def pretrain_argv(data: Path, run: Path, *extra: object) -> list[object]:
    return ["pretrain", "--data", data, "--out", run, *TINY, "--max-steps", "2", *extra]


def corpus_argv(corpus: Path, run: Path, *extra: object) -> list[object]:
    return ["pretrain", "--corpus", corpus, "--out", run, *TINY, "--max-steps", "2", *extra]


def error_line(err: str) -> str:
    """The one line an error ends in; nothing else on stderr says error or Traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("bertforge: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tampered(
    data_dir: Path, root: Path, change: Callable[[Path, dict], None], seal: bool = True
) -> Path:
    """A copy of `data_dir` with `change(copy, manifest)` applied; sealed: the manifest's
    checksums recomputed afterwards."""
    data = root / "data"
    shutil.copytree(data_dir, data)
    manifest = json.loads((data / "manifest.json").read_text())
    change(data, manifest)
    if seal:
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                shard["sha256"] = sha256(data / shard["file"])
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, by relative path, with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> Path:
    """A finished tiny run (a checkpoint at step 2) on a copy of the shared data."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    shutil.copytree(data_dir, data)
    run = root / "run"
    assert main([str(a) for a in pretrain_argv(data, run)]) == 0
    return run


# ---------------------------------------------------------------- 12: ids outside the vocab


def flip_bytes(data: Path, manifest: dict) -> None:
    shard = data / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[41] ^= 0xFF  # token 20 of the first sequence: its high byte (little-endian)
    shard.write_bytes(bytes(raw))


def write_big_id(data: Path, manifest: dict) -> None:
    shard = data / "train-00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[5] = manifest["vocab_size"] + 7
    ids.tofile(shard)


def shrink_vocab(data: Path, manifest: dict) -> None:
    manifest["vocab_size"] = 50  # the special ids still fit; the text's ids do not


@pytest.mark.parametrize("change", [flip_bytes, write_big_id, shrink_vocab])
def test_ids_outside_the_vocabulary_are_refused_before_training(tmp_path, data_dir, capsys, change):
    data = tampered(data_dir, tmp_path, change)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *pretrain_argv(data, run))
    line = error_line(err)
    assert code == 2
    assert "train-00000.bin holds token id" in line and "outside the vocabulary" in line
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()


@pytest.mark.parametrize("change", [flip_bytes, write_big_id, shrink_vocab])
def test_ids_outside_the_vocabulary_are_refused_before_evaluating(
    tmp_path, data_dir, trained, capsys, change
):
    data = tampered(data_dir, tmp_path, change)
    before = snapshot(trained)
    code, out, err = run_cli(capsys, "evaluate", trained, "--data", data)
    line = error_line(err)
    assert code == 2 and out == ""
    assert "train-00000.bin holds token id" in line and "outside the vocabulary" in line
    assert snapshot(trained) == before


# ---------------------------------------------------------------- 13: content hashes


def shuffle_ids(data: Path, manifest: dict) -> None:
    """Same size, in-vocabulary ids: only a content hash tells."""
    shard = data / "train-00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    np.random.default_rng(0).shuffle(ids)
    ids.tofile(shard)


def test_prepare_records_each_shards_sha256(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    recorded = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert recorded and all(s["sha256"] == sha256(data_dir / s["file"]) for s in recorded)


def test_rewritten_shard_is_refused_at_start(tmp_path, data_dir, capsys):
    data = tampered(data_dir, tmp_path, shuffle_ids, seal=False)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *pretrain_argv(data, run))
    assert code == 2
    assert error_line(err).endswith(
        "train-00000.bin: sha256 mismatch, the shard changed "
        "since it was prepared; prepare the data again"
    )
    assert not (run / "checkpoints").exists()


def test_rewritten_shard_is_refused_on_resume_and_by_evaluate(tmp_path, data_dir, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *pretrain_argv(data, run))
    assert code == 0, err
    shuffle_ids(data, {})
    before = snapshot(run)
    code, _, err = run_cli(capsys, *pretrain_argv(data, run, "--resume"))
    assert code == 2 and "train-00000.bin: sha256 mismatch" in error_line(err)
    code, out, err = run_cli(capsys, "evaluate", run)
    assert code == 2 and out == "" and "train-00000.bin: sha256 mismatch" in error_line(err)
    assert snapshot(run) == before


def drop_hashes(data: Path, manifest: dict) -> None:
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["sha256"]


def test_a_manifest_without_shard_hashes_is_refused(tmp_path, data_dir, capsys):
    unsealed = tampered(data_dir, tmp_path / "unsealed", drop_hashes, seal=False)
    code, _, err = run_cli(capsys, *pretrain_argv(unsealed, tmp_path / "run"))
    assert code == 2 and "shards[0].sha256 must be 64 hex digits" in error_line(err)


def test_verify_data_reads_in_flat_memory(tmp_path, data_dir, monkeypatch):
    """One pass in chunks: a chunk far smaller than a shard still finds its last token."""
    from bertforge.data import loader

    def last_id(data: Path, manifest: dict) -> None:
        shard = data / "train-00000.bin"
        ids = np.fromfile(shard, dtype=np.uint16)
        ids[-1] = manifest["vocab_size"]
        ids.tofile(shard)

    data = tampered(data_dir, tmp_path, last_id)
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    monkeypatch.setattr(loader, "_SCAN_BYTES", 64)
    verify_data(data_dir)
    with pytest.raises(BertforgeError, match=f"holds token id {vocab}, outside"):
        verify_data(data)


# ---------------------------------------------------------------- 18: symlink loops


class Hung(Exception):
    """Not an OSError (TimeoutError is one): os.walk would swallow that, and go on."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail, instead of hanging, when the block runs longer than `seconds`."""

    def expire(signum, frame):
        raise Hung(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def looped_corpus(tmp_path) -> Path:
    """corpus/{a.txt, sub/b.txt} with two symlink loops: 2**40 paths to walk, naively."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_corpus(corpus / "a.txt", documents=30, seed=1)
    write_corpus(corpus / "sub" / "b.txt", documents=30, seed=2)
    (corpus / "sub" / "loop").symlink_to("..")
    (corpus / "sub" / "again").symlink_to("../sub")
    return corpus


@pytest.mark.parametrize("spec", ["{corpus}", "{corpus}/**/*.txt"])
def test_symlink_loops_visit_each_file_once(tmp_path, looped_corpus, capsys, spec):
    spec = spec.format(corpus=looped_corpus)
    with deadline(60):
        code, _, err = run_cli(
            capsys, "tokenizer", spec, "--out", tmp_path / "tok", "--vocab-size", 120, "--quiet"
        )
        assert code == 0, err
        code, _, err = run_cli(
            capsys,
            "prepare",
            spec,
            "--tokenizer",
            tmp_path / "tok",
            "--out",
            tmp_path / "data",
            "--seq-len",
            32,
            "--quiet",
        )
        assert code == 0, err
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["corpus_files"] == [
        str(looped_corpus / "a.txt"),
        str(looped_corpus / "sub" / "b.txt"),
    ]
    assert manifest["corpus_stats"]["documents"] == 60


# ---------------------------------------------------------------- 19: a stale cache in RUN_DIR


def other_corpus(path: Path) -> Path:
    """Text with other words than conftest's, so that its tokenizer differs."""
    rng = random.Random(7)
    words = (
        "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega quartz violin "
        "marble lantern harbor meadow canyon glacier"
    ).split()
    docs = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(80)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def stop_before_training(monkeypatch) -> None:
    """As if the run were killed in its first step, before any checkpoint (a start that
    fails before training removes what it built; one that has begun keeps it)."""
    from bertforge.commands import pretrain

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "fit", interrupted)


def test_rerun_after_an_interrupted_run_rebuilds_from_the_new_input(
    tmp_path, corpus_file, capsys, monkeypatch
):
    from bertforge.config import RunConfig
    from bertforge.data.tokenizer import load_tokenizer

    run = tmp_path / "run"
    stop_before_training(monkeypatch)
    code, _, err = run_cli(capsys, *corpus_argv(corpus_file, run, "--vocab-size", 150))
    assert code == 130, err
    first = load_tokenizer(run / "tokenizer").get_vocab_size()
    new = other_corpus(tmp_path / "other.txt")
    code, _, err = run_cli(capsys, *corpus_argv(new, run, "--vocab-size", 250))
    assert code == 130, err
    assert "was built from other input, rebuilding it" in err
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["corpus_files"] == [str(new)]
    vocab = load_tokenizer(run / "tokenizer").get_vocab_size()
    assert vocab != first and manifest["vocab_size"] == vocab
    assert RunConfig.load(run / "config.yaml").model.vocab_size == vocab
    built = json.loads((run / "built_from.json").read_text())
    assert built["vocab_size"] == 250 and built["corpus"][0][0] == str(new)
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == [".bertforge"]
    # The same command again builds nothing.
    code, _, err = run_cli(capsys, *corpus_argv(new, run, "--vocab-size", 250))
    assert code == 130 and "rebuilding" not in err and "trained in" not in err


def test_rerun_with_another_tokenizer_replaces_the_cached_one(
    tmp_path, corpus_file, tokenizer_dir, capsys, monkeypatch
):
    from bertforge.data.tokenizer import tokenizer_hash

    run = tmp_path / "run"
    stop_before_training(monkeypatch)
    code, _, err = run_cli(capsys, *corpus_argv(corpus_file, run, "--vocab-size", 120))
    assert code == 130, err
    code, _, err = run_cli(capsys, *corpus_argv(corpus_file, run, "--tokenizer", tokenizer_dir))
    assert code == 130, err
    assert tokenizer_hash(run / "tokenizer") == tokenizer_hash(tokenizer_dir)
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["tokenizer_hash"] == tokenizer_hash(tokenizer_dir)


@pytest.mark.parametrize(
    "change, named",
    [
        ("corpus", "the corpus has a new file"),
        ("vocab", "vocab_size was 150, now 250"),
        ("dedup", "corpus option dedup was False, now True"),
    ],
)
def test_changed_input_is_refused_once_the_run_has_a_checkpoint(
    tmp_path, corpus_file, capsys, change, named
):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *corpus_argv(corpus_file, run, "--vocab-size", 150))
    assert code == 0, err
    before = snapshot(run)
    corpus, extra = corpus_file, ["--vocab-size", 150]
    if change == "corpus":
        corpus = other_corpus(tmp_path / "other.txt")
    elif change == "vocab":
        extra = ["--vocab-size", 250]
    else:
        extra.append("--dedup")
    code, _, err = run_cli(capsys, *corpus_argv(corpus, run, "--resume", *extra))
    line = error_line(err)
    assert code == 2 and named in line and "another --out" in line
    assert snapshot(run) == before
    # The run's own input resumes (here: a finished run, nothing more to do).
    code, _, err = run_cli(capsys, *corpus_argv(corpus_file, run, "--resume", "--vocab-size", 150))
    assert code == 0, err


# ---------------------------------------------------------------- 22a: manifest field types


def set_field(path: tuple, value) -> Callable[[Path, dict], None]:
    def change(data: Path, manifest: dict) -> None:
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


@pytest.mark.parametrize(
    "path, value, field",
    [
        (("seq_len",), "32", "seq_len"),
        (("seq_len",), "x" * 100_000, "seq_len"),
        (("vocab_size",), 200.5, "vocab_size"),
        (("dtype",), ["uint16"], "dtype"),
        (("special_token_ids", "pad"), "0", "special_token_ids.pad"),
        (("splits", "train", "shards", 0, "sequences"), "10", "splits.train.shards[0].sequences"),
        (
            ("splits", "train", "shards", 0, "file"),
            "../../manifest.json",
            "splits.train.shards[0].file",
        ),
        (("splits", "train", "shards", 0, "sha256"), "z" * 64, "splits.train.shards[0].sha256"),
        (("splits", "valid"), None, "splits.valid"),
        (("valid_fraction",), "0.05", "valid_fraction"),
        (("tokenizer_hash",), "\x1b[2J" * 1000, "tokenizer_hash"),
    ],
)
def test_manifest_field_of_the_wrong_type_is_one_short_line(
    tmp_path, data_dir, capsys, path, value, field
):
    data = tampered(data_dir, tmp_path, set_field(path, value), seal=False)
    code, _, err = run_cli(capsys, *pretrain_argv(data, tmp_path / "run"))
    line = error_line(err)
    assert code == 2 and f"manifest field {field} must be" in line
    assert len(line) < 300 + len(str(data)) and "\x1b" not in err


# ---------------------------------------------------------------- 22b: file content in messages


def test_binary_junk_is_quoted_short_and_escaped(
    tmp_path, corpus_file, tokenizer_dir, capsys, caplog
):
    rng = random.Random(3)
    junk = tmp_path / "junk.csv"
    header = ",".join(
        "\u202e\u200b" + "".join(rng.choice("abcdef") for _ in range(28)) for _ in range(30)
    )  # ~900 characters of column names, bidi overrides
    junk.write_bytes(
        header.encode() + b"\x1b[31m\n" + bytes(rng.randrange(256) for _ in range(2000))
    )
    code, _, err = run_cli(
        capsys,
        "prepare",
        junk,
        corpus_file,
        "--tokenizer",
        tokenizer_dir,
        "--out",
        tmp_path / "data",
        "--seq-len",
        32,
        "--quiet",
    )
    assert code == 0, err
    err += "\n".join(caplog.messages)  # the warning naming the skipped file is logged
    quoted = [line for line in err.splitlines() if "junk.csv" in line]
    assert quoted and all("no column 'text'" in line for line in quoted)
    assert all(len(line) - len(str(junk)) < 200 for line in quoted), quoted
    assert "\u202e" not in err and "\x1b" not in err and "\\u202e" in err
    code, _, err = run_cli(
        capsys,
        "prepare",
        junk,
        "--tokenizer",
        tokenizer_dir,
        "--out",
        tmp_path / "data2",
        "--seq-len",
        32,
        "--quiet",
    )
    line = error_line(err)
    assert code == 2 and len(line) - len(str(junk)) < 250 and "\u202e" not in line
    assert not (tmp_path / "data2").exists()


def test_parquet_column_names_are_escaped(tmp_path, corpus_file, tokenizer_dir, capsys, caplog):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    names = ["\x1b[2J" + "y" * 100, "b"]
    pq.write_table(pa.table({n: ["some text"] for n in names}), tmp_path / "t.parquet")
    code, _, err = run_cli(
        capsys,
        "prepare",
        tmp_path / "t.parquet",
        corpus_file,
        "--tokenizer",
        tokenizer_dir,
        "--out",
        tmp_path / "data",
        "--seq-len",
        32,
        "--quiet",
    )
    assert code == 0, err
    err += "\n".join(caplog.messages)
    assert "\x1b" not in err and "\\x1b[2Jyyy" in err
    assert all(
        len(line) - len(str(tmp_path)) < 200 for line in err.splitlines() if "t.parquet" in line
    )


# ---------------------------------------------------------------- 22c: leftovers of killed runs


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


def test_leftovers_of_killed_prepares_are_removed_but_not_a_live_ones(
    tmp_path, corpus_file, tokenizer_dir, capsys
):
    out = tmp_path / "data"
    dead = [
        tmp_path / f".data.{dead_pid()}-0badc0de.partial",
        tmp_path / f".data.{dead_pid()}-12345678.old",
    ]
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = tmp_path / f".data.{live_proc.pid}-deadbeef.partial"
    other = tmp_path / f".other.{dead_pid()}-0badc0de.partial"  # another output's
    try:
        for d in (*dead, live, other):
            d.mkdir()
            (d / "train-00000.bin").write_bytes(b"\0" * 64)
        code, _, err = run_cli(
            capsys,
            "prepare",
            corpus_file,
            "--tokenizer",
            tokenizer_dir,
            "--out",
            out,
            "--seq-len",
            32,
            "--quiet",
        )
        assert code == 0, err
        assert not any(d.exists() for d in dead)
        assert (live / "train-00000.bin").is_file() and other.is_dir()
        assert (out / "manifest.json").is_file()
    finally:
        live_proc.kill()
        live_proc.wait()


# ---------------------------------------------------------------- 16b: a full disk

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from bertforge.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_while_preparing_is_one_line_and_leaves_nothing(
    tmp_path, corpus_file, tokenizer_dir, workers
):
    out = tmp_path / "out" / "data"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LIMITED.format(limit=4096),
            "prepare",
            str(corpus_file),
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(out),
            "--seq-len",
            "32",
            "--workers",
            str(workers),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"bertforge: error: cannot write {out}: File too large (the partial output was removed)"
    ]
    assert proc.stdout == ""
    assert not out.exists() and not list(tmp_path.rglob(".*"))  # no partial directory


def test_full_disk_keeps_the_earlier_data(tmp_path, data_dir, corpus_file, tokenizer_dir):
    out = tmp_path / "data"
    shutil.copytree(data_dir, out)
    before = snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            LIMITED.format(limit=4096),
            "prepare",
            str(corpus_file),
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(out),
            "--seq-len",
            "32",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
