"""Every GPU check in one prepared run that finishes inside one 10-minute command:
correctness, throughput against transformers, a profile, and a real pretraining run with
GLUE on top.

    python benchmarks/gpu_check.py --stage-data benchmarks/data   # once, where the data is:
                  # copies the Wikipedia sample and GLUE SST-2/CoLA from ../shared/data (or
                  # --from DIR) into benchmarks/data/, which git ignores: carry that folder
    python benchmarks/gpu_check.py --out OUT            # on the GPU machine, ~540 s
    python benchmarks/gpu_check.py --out OUT --smoke    # the same stages at tiny sizes, but
                                                        # not compiled, anywhere (twice the caps)

The stages, in this order, each in a subprocess under a time cap (scaled to --budget, 540 s
by default), with its output streamed to the console and log.txt as it comes; a failure is
recorded and the next stage still runs, a stage with too little time left is skipped and
says so, and results.json is written after every stage, so a run cut short keeps what
it measured:

1. env: torch, CUDA, the device, native bf16, pytest and transformers, the bf16 matmul
   peak measured on it.
2. tests: `pytest -m cuda` (tests/test_cuda.py). Skipped, saying how to bring it, where
   pytest is missing: pip download pytest and its needs as wheels here, carry them, and
   install them with `pip install --no-index --target` there.
3. bench: eager rows, one process each: `bertforge bench --vs-hf --no-fp32` for mini and
   base at batch 256 x 128 and base at 32 x 512 (bertforge against transformers' eager and
   sdpa attention, without --vs-hf where transformers is missing); MFU against the
   measured peak.
4. profile: the kernels that take the time of a base step (torch.profiler).
5. pretrain: `pretrain --corpus` on the Wikipedia sample, preset small, a 75-second
   training budget, batch 256, lr 1e-3, then `evaluate` (held-out MLM loss and the
   unigram baseline).
6. glue: SST-2 and CoLA fine-tuned from that model and `--from-scratch`, one epoch each.
7. compiled: base 256 x 128 through torch.compile, bertforge's row and transformers' row
   each in its own process, last: a compile that fails or runs long loses no other row.

Everything goes to OUT: results.json (all figures), log.txt (every command and its
output), bench-*.json, profile.json, and the runs. A short table is printed last. Nothing
outside the checkout is needed: the data is read from --data (default benchmarks/data/),
and in smoke mode a tiny synthetic corpus and GLUE files are written when it is absent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "benchmarks" / "data"
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_BUDGET = 540.0  # seconds: a 10-minute command, less the start and the transfers

# (name, preset, batch, seq_len, what): "eager" rows run third, "compiled" and
# "hf-compiled" (transformers' sdpa through torch.compile) rows last.
BENCH_GPU = [
    ("mini-256x128", "mini", 256, 128, "eager"),
    ("base-256x128", "base", 256, 128, "eager"),
    ("base-32x512", "base", 32, 512, "eager"),
    ("base-256x128-compiled", "base", 256, 128, "compiled"),
    ("base-256x128-hf-compiled", "base", 256, 128, "hf-compiled"),
]
# Smoke mode checks that every stage runs, not torch.compile (the tests of bertforge.train
# compile training steps; compiling one here costs the CPU about a minute).
BENCH_SMOKE = [("tiny-8x64", "tiny", 8, 64, "eager")]

# Each stage's time cap, in seconds of the default budget (scaled to --budget): together
# they fill it, the compiled rows taking what is left at the end.
CAPS = {
    "env": 30,
    "tests": 60,
    "bench": 40,
    "profile": 25,
    "pretrain": 150,
    "glue": 40,
    "compiled": 70,
}
NEEDS = 0.3  # a stage starts only with at least this share of its cap left

PYTEST_HINT = (
    "pytest is not installed for this Python: bring it as wheels, pure Python "
    "(where there is a network: `pip download --no-deps --only-binary=:all: -d "
    ".whl pytest pluggy iniconfig packaging`; carry .whl; there: `pip install "
    "--no-index --no-deps --target /tmp/site .whl/*.whl` and "
    "PYTHONPATH=/tmp/site); the other stages run without it"
)


class Check:
    """Runs the stages, keeps the log and the results, and watches the time budget."""

    def __init__(self, out: Path, budget: float, smoke: bool):
        self.out, self.budget, self.smoke = out, budget, smoke
        self.start = time.monotonic()
        self.log_file = open(out / "log.txt", "a", buffering=1)
        self.results: dict[str, Any] = {
            "mode": "smoke" if smoke else "gpu",
            "budget_s": budget,
            "steps": {},
        }
        self.env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
        )
        self.deadline = float("inf")  # the running stage's end

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def cap(self, kind: str) -> float:
        return CAPS[kind] * self.budget / DEFAULT_BUDGET

    def log(self, text: str) -> None:
        self.log_file.write(text + "\n")
        print(text, flush=True)

    def step(self, name: str, kind: str, work: Callable[[], Any]) -> Any:
        """Run `work` as stage `name` under the cap of `kind` (or what is left of the
        budget, if less); record what it gave and write results.json."""
        record: dict[str, Any] = {}
        self.results["steps"][name] = record
        cap = self.cap(kind)
        if self.left() < NEEDS * cap:
            record.update(
                ok=False,
                skipped=f"out of time ({self.left():.0f}s left, needs ~{NEEDS * cap:.0f}s)",
            )
            self.log(f"== {name}: skipped, {record['skipped']}")
            self.save()
            return None
        limit = min(cap, self.left())
        self.log(f"== {name} (cap {limit:.0f}s; {self.left():.0f}s of the budget left)")
        t0 = time.monotonic()
        self.deadline = t0 + limit
        try:
            record["result"] = work()
            record["ok"] = True
        except Skip as e:
            record.update(ok=False, skipped=str(e))
            self.log(f"== {name}: skipped, {e}")
        except Exception as e:  # recorded; the next stage still runs
            record.update(ok=False, error=f"{type(e).__name__}: {e}")
            self.log(f"!! {name} failed: {record['error']}")
        finally:
            self.deadline = float("inf")
        record["seconds"] = round(time.monotonic() - t0, 1)
        self.save()
        return record.get("result")

    def run(self, *args: str) -> str:
        """A command (argv) under this Python, stopped at the stage's deadline; its output
        streams to the console and the log as it comes; stdout returned."""
        argv = [sys.executable, *args]
        self.log("$ " + " ".join(argv[1:]))
        limit = max(1.0, self.deadline - time.monotonic())
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=ROOT,
            start_new_session=True,
        )
        out: list[str] = []
        err: list[str] = []

        def pump(stream: Any, keep: list[str]) -> None:
            for line in stream:
                keep.append(line)
                self.log_file.write(line)
                print("   " + line, end="", flush=True)

        pumps = [
            threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, err), daemon=True),
        ]
        for t in pumps:
            t.start()
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the command and what it started
            proc.wait()
            raise TimeoutError(f"stopped at its cap of {limit:.0f}s") from None
        finally:
            for t in pumps:
                t.join(timeout=5)
        if proc.returncode != 0:
            tail = (
                [x for x in "".join(err).strip().splitlines() if x]
                or "".join(out).strip().splitlines()
                or ["no output"]
            )[-1]
            raise RuntimeError(f"exit {proc.returncode}: {tail}")
        return "".join(out)

    def bertforge(self, *args: str) -> str:
        return self.run("-m", "bertforge", *args)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        path = self.out / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1) + "\n")
        tmp.replace(path)  # a run killed mid-write keeps the last whole file


class Skip(Exception):
    """A stage that cannot run here, and why (recorded as skipped, not failed)."""


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# -------------------------------------------------------------------------------- stages


def env_inner(smoke: bool) -> dict[str, Any]:
    """In its own process (`--inner env`): what the machine is."""
    import torch

    from bertforge.commands.bench import matmul_peak
    from bertforge.train.runtime import resolve_device, resolve_precision

    device = resolve_device("auto")
    if not smoke and device.type != "cuda":
        raise RuntimeError("no CUDA device: run with --smoke on a machine without a GPU")
    dtype = resolve_precision("auto", device) or torch.float32
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "python": sys.version.split()[0],
        "dtype": str(dtype),
    }
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["bf16_native"] = torch.cuda.is_bf16_supported(including_emulation=False)
        info["memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    info["pytest"] = has_module("pytest")
    info["matmul_peak_tflops"] = round(matmul_peak(device, dtype) / 1e12, 1)
    return info


def profile_inner(smoke: bool) -> list[dict[str, Any]]:
    """In its own process (`--inner profile`): the ops of a base step (tiny in smoke)."""
    from bertforge.commands.bench import profile_steps
    from bertforge.config import preset

    cfg = preset("tiny" if smoke else "base", vocab_size=2000 if smoke else 30522)
    return profile_steps(cfg, 8 if smoke else 256, 64 if smoke else 128, steps=2 if smoke else 3)


def inner(check: Check, what: str) -> Any:
    """`--inner what` of this script in a subprocess; its last line of output, as JSON."""
    out = check.run(
        str(Path(__file__).resolve()), "--inner", what, *(["--smoke"] if check.smoke else [])
    )
    return json.loads(out.strip().splitlines()[-1])


def env_step(check: Check) -> dict[str, Any]:
    info = inner(check, "env")
    return info


def tests_step(check: Check) -> dict[str, Any]:
    if not has_module("pytest"):
        raise Skip(PYTEST_HINT)
    out = check.run(
        "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_cuda.py"
    )
    return {"summary": out.strip().splitlines()[-1] if out.strip() else ""}


def bench_step(
    check: Check, name: str, preset: str, batch: int, seq_len: int, what: str
) -> dict[str, Any]:
    steps = ["--steps", "2", "--warmup", "1"] if check.smoke else ["--steps", "6", "--warmup", "2"]
    hf = has_module("transformers")
    if what == "hf-compiled" and not hf:
        raise Skip("transformers is not installed for this Python")
    flags = {
        "eager": ["--vs-hf"] if hf else [],
        "compiled": ["--compile"],
        "hf-compiled": ["--vs-hf", "--hf-compile"],
    }[what]
    vocab = ["--vocab-size", "2000"] if check.smoke else []
    out = check.bertforge(
        "bench",
        "--preset",
        preset,
        "--batch-size",
        str(batch),
        "--seq-len",
        str(seq_len),
        "--no-fp32",
        "--json",
        *steps,
        *vocab,
        *flags,
    )
    result = json.loads(out.strip().splitlines()[-1])
    if what == "eager" and not hf:
        result["note"] = "transformers is not installed for this Python: bertforge alone"
    (check.out / f"bench-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def profile_step(check: Check) -> list[dict[str, Any]]:
    rows = inner(check, "profile")
    (check.out / "profile.json").write_text(json.dumps(rows, indent=1) + "\n")
    for r in rows:
        check.log(
            f"  {100 * r['share']:5.1f}%  {r['ms_per_step']:9.3f} ms/step  "
            f"{r['calls_per_step']:6.0f} calls  {r['name'][:90]}"
        )
    return rows


def pretrain_step(check: Check, corpus: Path) -> dict[str, Any]:
    run = check.out / "pretrain"
    shutil.rmtree(run, ignore_errors=True)
    if check.smoke:
        recipe = (
            "--preset tiny --max-steps 10 --batch-size 16 --seq-len 64 --vocab-size 2000"
        ).split()
    else:  # a short-budget GPU recipe: large batch (one micro-batch, the GPU default),
        # high lr, no dropout
        recipe = "--preset small --time-budget 75s --batch-size 256 --eval-every 500".split()
    out = check.bertforge(
        "pretrain",
        "--corpus",
        str(corpus),
        "--out",
        str(run),
        *recipe,
        "--lr",
        "1e-3",
        "--warmup-fraction",
        "0.06",
        "--dropout",
        "0",
        "--quiet",
    )
    result = json.loads(out.strip().splitlines()[-1])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    result["tokens_per_s"] = round(result["tokens"] / max(result["elapsed_s"], 1e-9), 1)
    result["last_logged_tokens_per_s"] = train[-1]["tokens_per_s"] if train else None
    evaluation = json.loads(check.bertforge("evaluate", str(run)).strip().splitlines()[-1])
    result["evaluate"] = evaluation
    return result


def glue_step(check: Check, glue: Path, label: str) -> dict[str, Any]:
    model = check.out / "pretrain"
    if not (model / "config.yaml").is_file():
        raise Skip("no pretrained model (the pretrain stage did not finish)")
    # Eager: an epoch of SST-2 is long enough to compile by default, and the stage's time
    # cap has no room for compiling each task (the compiled stage measures compilation).
    common = [
        "--data-dir",
        str(glue),
        "--tasks",
        "sst2",
        "cola",
        "--lr",
        "1e-4",
        "--max-length",
        "64",
        "--json",
        "--quiet",
        "--epochs",
        "1",
        "--no-compile",
    ]
    common += ["--max-train-examples", "64"] if check.smoke else []
    out = check.out / f"glue-{label}"
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--from-scratch"] if label == "from_scratch" else []
    return json.loads(
        check.bertforge("glue", str(model), "--out", str(out), *common, *extra)
        .strip()
        .splitlines()[-1]
    )


def plan(check: Check, data: Path) -> list[tuple[str, str, Callable[[], Any]]]:
    """The stages in order: (name, kind of time cap, work)."""
    rows = BENCH_SMOKE if check.smoke else BENCH_GPU

    def bench(row: tuple[str, str, int, int, str]) -> Callable[[], Any]:
        return lambda: bench_step(check, *row)

    stages: list[tuple[str, str, Callable[[], Any]]] = [
        ("env", "env", lambda: env_step(check)),
        ("tests", "tests", lambda: tests_step(check)),
    ]
    stages += [(f"bench-{r[0]}", "bench", bench(r)) for r in rows if r[4] == "eager"]
    stages += [
        ("profile", "profile", lambda: profile_step(check)),
        ("pretrain", "pretrain", lambda: pretrain_step(check, data / "enwiki")),
        ("glue-pretrained", "glue", lambda: glue_step(check, data / "glue", "pretrained")),
        ("glue-from_scratch", "glue", lambda: glue_step(check, data / "glue", "from_scratch")),
    ]
    stages += [(f"bench-{r[0]}", "compiled", bench(r)) for r in rows if r[4] != "eager"]
    return stages


# ---------------------------------------------------------------------------------- data


def stage(source: Path, target: Path) -> None:
    """Copy the Wikipedia sample and GLUE SST-2/CoLA into `target` (benchmarks/data, which
    git ignores), to be carried to the GPU machine with the checkout."""
    parts = {
        "enwiki": source / "enwiki-2015-wikiextractor-sample",
        "glue/SST-2": source / "glue" / "SST-2",
        "glue/CoLA": source / "glue" / "CoLA",
    }
    for name, src in parts.items():
        if not src.is_dir():
            sys.exit(f"gpu_check: {src} not found (give --from DIR, the data folder)")
        shutil.rmtree(target / name, ignore_errors=True)
        shutil.copytree(src, target / name)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"staged {', '.join(parts)} into {target} ({size / 2**20:.0f} MiB)")


def synthetic_data(folder: Path) -> Path:
    """A tiny corpus and GLUE-layout SST-2 / CoLA files, for smoke runs without data."""
    rng = random.Random(0)
    nouns = ["cat", "dog", "bird", "king", "river", "city", "garden", "ship", "teacher", "doctor"]
    adjs = "small large red old young quiet bright happy dark good bad".split()

    def sentence() -> tuple[str, int]:
        adj = rng.choice(adjs)
        return f"the {adj} {rng.choice(nouns)} sees the {rng.choice(nouns)} .", int(
            adj in ("good", "happy", "bright")
        )

    text = folder / "enwiki" / "corpus.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text(
        "\n\n".join(" ".join(sentence()[0] for _ in range(8)) for _ in range(400)) + "\n"
    )
    for task, header in (("SST-2", "sentence\tlabel\n"), ("CoLA", "")):
        (folder / "glue" / task).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", 200), ("dev", 40)):
            rows = []
            for _ in range(n):
                s, y = sentence()
                rows.append(f"{s}\t{y}\n" if task == "SST-2" else f"src\t{y}\t\t{s}\n")
            (folder / "glue" / task / f"{split}.tsv").write_text(header + "".join(rows))
    return folder


# --------------------------------------------------------------------------------- table


def table(results: dict[str, Any]) -> str:
    steps = results["steps"]
    lines = [
        f"gpu_check ({results['mode']}), {results.get('elapsed_s', 0):.0f}s of "
        f"{results.get('budget_s', 0):.0f}s"
    ]
    env = steps.get("env", {}).get("result") or {}
    if env:
        lines.append(
            f"  {env.get('name', env.get('device'))}, torch {env['torch']}, "
            f"transformers {env.get('transformers')}, matmul peak "
            f"{env['matmul_peak_tflops']} TFLOP/s ({env['dtype']})"
        )
    lines.append("  | bench | bertforge best tok/s (MFU) | transformers best | ratio |")
    for name, record in steps.items():
        if not name.startswith("bench-"):
            continue
        r = record.get("result")
        if not r:
            lines.append(f"  | {name[6:]} | {_why(record)} | | |")
            continue
        ours = r["best"]
        hf = r.get("best_transformers", {})
        lines.append(
            f"  | {name[6:]} | {ours['tokens_per_s']:,.0f} ({100 * ours['mfu']:.1f}%) "
            f"{ours['name']} | "
            + (
                f"{hf['tokens_per_s']:,.0f} {hf['name']} | {r['speedup']:.2f}x |"
                if hf
                else "- | - |"
            )
        )
    for name in ("tests", "profile"):
        record = steps.get(name, {})
        summary = (record.get("result") or {}).get("summary") if name == "tests" else None
        lines.append(
            f"  {name}: {'ok' if record.get('ok') else _why(record)}"
            + (f" ({summary})" if summary else "")
        )
    pre = steps.get("pretrain", {})
    if pre.get("ok"):
        p = pre["result"]
        e = p["evaluate"]
        lines.append(
            f"  pretrain: {p['step']} steps, {p['tokens']:,} tokens, "
            f"{p['tokens_per_s']:,.0f} tok/s; held-out MLM loss {e['mlm_loss']:.3f} "
            f"vs unigram {e['unigram_baseline_loss']:.3f}"
        )
    else:
        lines.append(f"  pretrain: {_why(pre)}")
    for label in ("pretrained", "from_scratch"):
        glue = steps.get(f"glue-{label}", {})
        if glue.get("ok"):
            scores = ", ".join(
                f"{task} {r['score']:.3f}" for task, r in glue["result"]["tasks"].items()
            )
            lines.append(f"  glue {label}: {scores}")
        else:
            lines.append(f"  glue {label}: {_why(glue)}")
    return "\n".join(lines)


def _why(record: dict[str, Any]) -> str:
    return record.get("skipped") or record.get("error") or "not run"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    p.add_argument("--out", type=Path, help="directory for results.json, log.txt and runs")
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="holds enwiki/ and glue/{SST-2,CoLA} (default: benchmarks/data)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, any device (the CPU included): checks the script",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole run (default: {DEFAULT_BUDGET:.0f}, twice "
        f"that with --smoke); each stage's cap is scaled to it",
    )
    p.add_argument(
        "--stage-data",
        type=Path,
        metavar="DIR",
        help="copy the data into DIR (benchmarks/data: git-ignored, to be carried), then stop",
    )
    p.add_argument("--stage", action="store_true", help="the same into --data")
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=SHARED,
        help="with --stage-data: the data folder to copy from (default: ../shared/data)",
    )
    p.add_argument("--inner", choices=("env", "profile"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:  # one piece of a stage, in its own process
        sys.path.insert(0, str(ROOT))
        work = env_inner if args.inner == "env" else profile_inner
        print(json.dumps(work(args.smoke)))
        return 0
    if args.stage_data or args.stage:
        stage(args.source, args.stage_data or args.data)
        return 0
    if args.out is None:
        p.error("give --out DIR (or --stage-data DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    # Smoke runs check the script, not the speed: twice the caps, for a busy CPU.
    check = Check(args.out, args.budget or DEFAULT_BUDGET * (2 if args.smoke else 1), args.smoke)
    data = args.data
    if not (data / "enwiki").is_dir() or not (data / "glue").is_dir():
        if not args.smoke:
            sys.exit(
                f"gpu_check: no data in {data}; run `python benchmarks/gpu_check.py "
                f"--stage-data benchmarks/data` where the data is, then carry "
                f"benchmarks/data"
            )
        data = synthetic_data(args.out / "synthetic")
    for name, kind, work in plan(check, data):
        check.step(name, kind, work)
    check.save()
    text = table(check.results)
    (args.out / "table.txt").write_text(text + "\n")
    check.log(text)
    return 0 if all(r.get("ok") or "skipped" in r for r in check.results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
