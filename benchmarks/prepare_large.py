"""Preparing a large corpus in flat memory: MB/s and peak resident memory of `prepare`.

The corpus is the given text (default: the shared Wikipedia sample) written out
`--copies` times as separate plain-text files, about 12 MB each, so 85 copies make about
1 GB. `bertforge prepare` then runs as its own process (all cores, its default), and its
resident memory, summed over the process and its tokenizing workers, is sampled every
50 ms from /proc (Linux).

    python benchmarks/prepare_large.py [CORPUS...] [--copies 85] [--tokenizer DIR]

Prints wall time, MB/s and peak RSS (the sum over processes, and the largest single
one); with --json, also writes them there. Repeating one text is a best case for
prepare's chunk cache (every word after the first copy is a cache hit): the memory
figure is the point here, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bertforge.data.corpus import iter_documents, resolve_corpus
from bertforge.data.tokenizer import train_tokenizer

DEFAULT_CORPUS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "enwiki-2015-wikiextractor-sample"
)


def _tree_rss(pid: int) -> list[int]:
    """Resident bytes of `pid` and each of its descendants (those still alive)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    rss, todo = [], [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            rss.append(int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page)
        except OSError:
            continue
        todo.extend(children.get(p, []))
    return rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", nargs="*", default=[str(DEFAULT_CORPUS)])
    p.add_argument("--copies", type=int, default=85)
    p.add_argument("--tokenizer", type=Path, help="default: trained on one copy")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        text = "".join(d + "\n\n" for d in iter_documents(resolve_corpus(args.corpus)))
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        for i in range(args.copies):
            (corpus / f"part-{i:04d}.txt").write_text(text, encoding="utf-8")
        size = sum(f.stat().st_size for f in corpus.iterdir())
        tok = args.tokenizer
        if tok is None:
            tok = tmp_path / "tok"
            train_tokenizer([str(corpus / "part-0000.txt")], tok, show_progress=False)
        print(f"corpus: {args.copies} copies, {size / 1e9:.2f} GB", flush=True)

        cmd = [
            sys.executable,
            "-m",
            "bertforge",
            "prepare",
            str(corpus),
            "--tokenizer",
            str(tok),
            "--out",
            str(tmp_path / "data"),
            "--seq-len",
            str(args.seq_len),
            "--quiet",
        ]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        peak_sum = peak_one = 0
        while proc.poll() is None:
            rss = _tree_rss(proc.pid)
            if rss:
                peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss))
            time.sleep(0.05)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"prepare failed with exit status {proc.returncode}")
        manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())

    result = {
        "copies": args.copies,
        "bytes": size,
        "wall_s": round(wall, 1),
        "mb_per_s": round(size / 1e6 / wall, 1),
        "cpus": os.cpu_count(),
        "peak_rss_mb_all_processes": round(peak_sum / 2**20, 1),
        "peak_rss_mb_largest_process": round(peak_one / 2**20, 1),
        "documents": manifest["corpus_stats"].get("documents"),
        "tokens": sum(s["tokens"] for s in manifest["splits"].values()),
    }
    print(
        f"prepare: {size / 1e9:.2f} GB in {wall:.1f} s ({result['mb_per_s']} MB/s); "
        f"peak RSS {result['peak_rss_mb_all_processes']:,.0f} MB over all processes, "
        f"{result['peak_rss_mb_largest_process']:,.0f} MB the largest"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
