"""Data preparation speed: `bertforge prepare` against transformers' run_mlm preprocessing.

Both run in this one process, on the same plain-text file and the same tokenizer:

- transformers: exactly what examples/pytorch/language-modeling/run_mlm.py does with
  ``line_by_line`` off: ``datasets.load_dataset("text", data_files=...)`` (one example a
  line, line breaks kept), ``map(tokenize_function, batched=True)`` with a
  `PreTrainedTokenizerFast` loaded from the bertforge tokenizer directory and
  ``return_special_tokens_mask=True``, then ``map(group_texts, batched=True)`` into
  blocks of ``--seq-len``. ``num_proc`` is the number of cores (run_mlm's
  ``--preprocessing_num_workers``; its default, one process, is slower), so both tools
  use every core. The datasets cache lives in a temporary directory and
  ``load_from_cache_file=False``, so nothing from an earlier run is reused.
- bertforge: `bertforge.data.prepare.prepare` on the same file, all cores (its default).

The input is the corpus (default: the shared Wikipedia sample) extracted once to plain
text, documents separated by blank lines; MB/s is that file's size over wall time.
Each repetition runs the transformers side first, then bertforge; the best time of each
over `--repeats` is reported (the least disturbed by other work on the machine), with
every time in the JSON.

    python benchmarks/prepare_vs_hf.py [CORPUS...] [--tokenizer DIR] [--repeats 3]

Prints MB/s for both and the ratio; writes benchmarks/results/prepare_vs_hf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from itertools import chain
from pathlib import Path
from typing import Any

from bertforge.data.corpus import iter_documents, resolve_corpus
from bertforge.data.prepare import prepare
from bertforge.data.tokenizer import train_tokenizer

DEFAULT_CORPUS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "enwiki-2015-wikiextractor-sample"
)
RESULTS = Path(__file__).resolve().parent / "results"


def extract_text(corpus: list[str], out: Path) -> int:
    """The corpus's documents as one plain-text file, blank-line separated; its bytes."""
    with open(out, "w", encoding="utf-8") as f:
        for doc in iter_documents(resolve_corpus(corpus)):
            f.write(doc + "\n\n")
    return out.stat().st_size


def run_transformers(
    text_file: Path, tok_dir: Path, seq_len: int, num_proc: int, cache_dir: Path
) -> dict[str, Any]:
    """run_mlm's preprocessing (line_by_line False), timed from load_dataset to the end."""
    import datasets
    import transformers
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()  # "longer than the maximum" per long line
    start = time.perf_counter()
    raw_datasets = datasets.load_dataset(
        "text", data_files={"train": str(text_file)}, cache_dir=str(cache_dir), keep_linebreaks=True
    )
    column_names = raw_datasets["train"].column_names
    text_column_name = "text" if "text" in column_names else column_names[0]

    def tokenize_function(examples):
        return tokenizer(examples[text_column_name], return_special_tokens_mask=True)

    tokenized_datasets = raw_datasets.map(
        tokenize_function,
        batched=True,
        num_proc=num_proc,
        remove_columns=column_names,
        load_from_cache_file=False,
    )

    def group_texts(examples):
        concatenated_examples = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated_examples[next(iter(examples.keys()))])
        if total_length >= seq_len:
            total_length = (total_length // seq_len) * seq_len
        return {
            k: [t[i : i + seq_len] for i in range(0, total_length, seq_len)]
            for k, t in concatenated_examples.items()
        }

    tokenized_datasets = tokenized_datasets.map(
        group_texts, batched=True, num_proc=num_proc, load_from_cache_file=False
    )
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "sequences": len(tokenized_datasets["train"]),
        "tokens": len(tokenized_datasets["train"]) * seq_len,
    }


def run_bertforge(text_file: Path, tok_dir: Path, seq_len: int, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    manifest = prepare([str(text_file)], tok_dir, out, seq_len=seq_len, show_progress=False)
    elapsed = time.perf_counter() - start
    splits = manifest["splits"].values()
    return {
        "seconds": elapsed,
        "sequences": sum(s["sequences"] for s in splits),
        "tokens": sum(s["tokens"] for s in splits),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "corpus",
        nargs="*",
        default=[str(DEFAULT_CORPUS)],
        help="files, directories or globs (default: the shared Wikipedia sample)",
    )
    p.add_argument(
        "--tokenizer",
        help="bertforge tokenizer directory (default: train one on the corpus, untimed)",
    )
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--num-proc",
        type=int,
        default=os.cpu_count() or 1,
        help="datasets.map processes (default: the number of cores)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs of each (default: 3)")
    p.add_argument("--out", type=Path, default=RESULTS / "prepare_vs_hf.json")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="prepare_vs_hf-") as tmp:
        tmp_dir = Path(tmp)
        text_file = tmp_dir / "corpus.txt"
        size = extract_text(args.corpus, text_file)
        tok_dir = (
            Path(args.tokenizer)
            if args.tokenizer
            else train_tokenizer([str(text_file)], tmp_dir / "tokenizer", show_progress=False)
        )
        text_file.read_bytes()  # both start from a warm page cache
        load_before = os.getloadavg()
        runs: dict[str, list[dict[str, Any]]] = {"hf": [], "bf": []}
        for i in range(args.repeats):
            runs["hf"].append(
                run_transformers(
                    text_file, tok_dir, args.seq_len, args.num_proc, tmp_dir / f"hf-cache-{i}"
                )
            )
            runs["bf"].append(
                run_bertforge(text_file, tok_dir, args.seq_len, tmp_dir / f"data-{i}")
            )
        load_after = os.getloadavg()

    mb = size / 1e6
    hf, bf = (min(runs[k], key=lambda r: r["seconds"]) for k in ("hf", "bf"))
    for name, r, key in (("transformers run_mlm", hf, "hf"), ("bertforge prepare", bf, "bf")):
        r["mb_per_s"] = round(mb / r["seconds"], 2)
        r["all_seconds"] = [round(x["seconds"], 2) for x in runs[key]]
        r["seconds"] = round(r["seconds"], 2)
        print(
            f"{name:22s} {r['seconds']:7.2f} s  {r['mb_per_s']:6.2f} MB/s  "
            f"{r['sequences']:,} sequences  (runs: {r['all_seconds']})"
        )
    ratio = round(hf["seconds"] / bf["seconds"], 2)
    print(
        f"bertforge is {ratio:.2f}x faster ({mb:.1f} MB of text, {os.cpu_count()} cores, "
        f"num_proc={args.num_proc}, load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after)"
    )

    import datasets
    import tokenizers
    import transformers

    result = {
        "input_mb": round(mb, 2),
        "seq_len": args.seq_len,
        "cores": os.cpu_count(),
        "num_proc": args.num_proc,
        "bertforge_workers": "all cores (default)",
        "repeats": args.repeats,
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "machine": cpu_model(),
        "versions": {
            "datasets": datasets.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "transformers_run_mlm": hf,
        "bertforge_prepare": bf,
        "speedup": ratio,
        "notes": "Wall time from reading the text file to the last sequence. transformers "
        "tokenizes each line with [CLS]/[SEP] (blank lines too) and drops each "
        "1,000-line group's remainder, hence its different sequence count; "
        "bertforge also writes the shards and a 1% held-out split.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
