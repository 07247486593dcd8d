"""Every GPU check in one prepared run: correctness, throughput against transformers, a
profile, and a real pretraining run with GLUE on top.

    python benchmarks/gpu_check.py --stage              # once, where the data is: copies the
                                                        # Wikipedia sample and GLUE SST-2/CoLA
                                                        # into benchmarks/data/ (git-ignored)
    python benchmarks/gpu_check.py --out OUT            # on the GPU machine
    python benchmarks/gpu_check.py --out OUT --smoke    # the same steps at tiny sizes, on any
                                                        # machine, in about a minute

The steps, in order (each timed; a failure is recorded and the next step still runs; a
step that would overrun `--budget` seconds is skipped and says so):

1. env: torch, CUDA, the device, native bf16, the bf16 matmul peak measured on it.
2. tests: `pytest -m cuda` (tests/test_cuda.py).
3. bench: `bertforge bench --vs-hf --no-fp32` for mini and base at batch 256 x 128
   (bertforge and transformers eager/sdpa; base also both compiled) and base at 32 x 512;
   MFU against the measured peak.
4. profile: the kernels that take the time of a base step (torch.profiler).
5. pretrain: `pretrain --corpus` on the Wikipedia sample, preset small, a 3-minute
   budget, batch 256, lr 1e-3, then `evaluate` (held-out MLM loss and the unigram
   baseline).
6. glue: SST-2 and CoLA fine-tuned from that model and `--from-scratch`, one epoch each.

Everything goes to OUT: results.json (all figures), log.txt (every command and its
output), profile.json, and the runs. A short table is printed last. Nothing outside the
checkout is needed: the data is read from --data (default benchmarks/data/), and in
smoke mode a tiny synthetic corpus and GLUE files are written when it is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "benchmarks" / "data"
SHARED = ROOT.parent / "shared" / "data"

# (name, preset, batch, seq_len, compile bertforge, compile transformers)
BENCH_GPU = [("mini-256x128", "mini", 256, 128, False, False),
             ("base-256x128", "base", 256, 128, True, True),
             ("base-32x512", "base", 32, 512, False, False)]
BENCH_SMOKE = [("tiny-8x64", "tiny", 8, 64, False, False)]


class Check:
    """Runs the steps, keeps the log and the results, and watches the time budget."""

    def __init__(self, out: Path, budget: float, smoke: bool):
        self.out, self.budget, self.smoke = out, budget, smoke
        self.start = time.monotonic()
        self.log_file = open(out / "log.txt", "a", buffering=1)
        self.results: dict[str, Any] = {"mode": "smoke" if smoke else "gpu", "steps": {}}
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def log(self, text: str) -> None:
        self.log_file.write(text + "\n")
        print(text, flush=True)

    def step(self, name: str, needs: float, work: Callable[[], Any]) -> Any:
        """Run `work` as step `name` if `needs` seconds are left; record what it gave."""
        record: dict[str, Any] = {}
        self.results["steps"][name] = record
        if self.left() < needs:
            record.update(ok=False, skipped=f"out of time ({self.left():.0f}s left, needs "
                                               f"~{needs:.0f}s)")
            self.log(f"== {name}: skipped, {record['skipped']}")
            return None
        self.log(f"== {name} ({self.left():.0f}s of the budget left)")
        t0 = time.monotonic()
        try:
            record["result"] = work()
            record["ok"] = True
        except Exception as e:  # recorded; the next step still runs
            record.update(ok=False, error=f"{type(e).__name__}: {e}")
            self.log(f"!! {name} failed: {record['error']}")
        record["seconds"] = round(time.monotonic() - t0, 1)
        self.save()
        return record.get("result")

    def run(self, *args: str, timeout: float | None = None) -> str:
        """A command (argv) under this Python; its output goes to the log; stdout returned."""
        argv = [sys.executable, *args]
        self.log("$ " + " ".join(argv[1:]))
        limit = max(30.0, self.left()) if timeout is None else timeout
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=ROOT,
                              timeout=limit)
        self.log_file.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines()
                    or ["no output"])[-1]
            raise RuntimeError(f"exit {proc.returncode}: {tail}")
        return proc.stdout

    def bertforge(self, *args: str, timeout: float | None = None) -> str:
        return self.run("-m", "bertforge", *args, timeout=timeout)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1) + "\n")


# --------------------------------------------------------------------------------- steps

def env_step(check: Check) -> dict[str, Any]:
    import torch

    from bertforge.bench import matmul_peak
    from bertforge.runtime import resolve_device, resolve_precision

    device = resolve_device("auto")
    if not check.smoke and device.type != "cuda":
        raise RuntimeError("no CUDA device: run with --smoke on a machine without a GPU")
    dtype = resolve_precision("auto", device) or torch.float32
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "python": sys.version.split()[0], "dtype": str(dtype)}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["bf16_native"] = torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    info["matmul_peak_tflops"] = round(matmul_peak(device, dtype) / 1e12, 1)
    check.log(json.dumps(info))
    return info


def tests_step(check: Check) -> dict[str, Any]:
    out = check.run("-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                    "tests/test_cuda.py")
    return {"summary": out.strip().splitlines()[-1] if out.strip() else ""}


def bench_step(check: Check, name: str, preset: str, batch: int, seq_len: int,
               compile_ours: bool, compile_hf: bool) -> dict[str, Any]:
    steps = ["--steps", "2", "--warmup", "1"] if check.smoke else ["--steps", "6", "--warmup",
                                                                   "2"]
    flags = (["--compile"] if compile_ours else []) + (["--hf-compile"] if compile_hf else [])
    out = check.bertforge("bench", "--preset", preset, "--batch-size", str(batch),
                          "--seq-len", str(seq_len), "--vs-hf", "--no-fp32", "--json",
                          *steps, *flags)
    result = json.loads(out.strip().splitlines()[-1])
    (check.out / f"bench-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def profile_step(check: Check) -> list[dict[str, Any]]:
    from bertforge.bench import profile_steps
    from bertforge.config import preset

    cfg = preset("tiny" if check.smoke else "base", vocab_size=30522)
    rows = profile_steps(cfg, 8 if check.smoke else 256, 64 if check.smoke else 128,
                         steps=2 if check.smoke else 3)
    (check.out / "profile.json").write_text(json.dumps(rows, indent=1) + "\n")
    for r in rows:
        check.log(f"  {100 * r['share']:5.1f}%  {r['ms_per_step']:9.3f} ms/step  "
                  f"{r['calls_per_step']:6.0f} calls  {r['name'][:90]}")
    return rows


def pretrain_step(check: Check, corpus: Path) -> dict[str, Any]:
    run = check.out / "pretrain"
    shutil.rmtree(run, ignore_errors=True)
    if check.smoke:
        recipe = ["--preset", "tiny", "--max-steps", "10", "--batch-size", "16",
                  "--seq-len", "64", "--vocab-size", "2000"]
    else:  # a short-budget GPU recipe: large batch, high lr, no dropout
        recipe = ["--preset", "small", "--time-budget", "3m", "--batch-size", "256",
                  "--micro-batch-size", "256", "--eval-every", "500"]
    out = check.bertforge("pretrain", "--corpus", str(corpus), "--out", str(run), *recipe,
                          "--lr", "1e-3", "--warmup-fraction", "0.06", "--dropout", "0",
                          "--quiet")
    result = json.loads(out.strip().splitlines()[-1])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    result["tokens_per_s"] = round(result["tokens"] / max(result["elapsed_s"], 1e-9), 1)
    result["last_logged_tokens_per_s"] = train[-1]["tokens_per_s"] if train else None
    evaluation = json.loads(check.bertforge("evaluate", str(run)).strip().splitlines()[-1])
    result["evaluate"] = evaluation
    return result


def glue_step(check: Check, glue: Path) -> dict[str, Any]:
    model = check.out / "pretrain"
    if not (model / "config.yaml").is_file():
        raise RuntimeError("no pretrained model (the pretrain step did not finish)")
    common = ["--data-dir", str(glue), "--tasks", "sst2", "cola", "--lr", "1e-4",
              "--max-length", "64", "--json", "--quiet"]
    # One epoch each: three of SST-2 do not fit the run's 7 minutes next to the rest.
    common += ["--epochs", "1"] + (["--max-train-examples", "64"] if check.smoke else [])
    results = {}
    for label, extra in (("pretrained", []), ("from_scratch", ["--from-scratch"])):
        out = check.out / f"glue-{label}"
        shutil.rmtree(out, ignore_errors=True)
        report = json.loads(check.bertforge("glue", str(model), "--out", str(out), *common,
                                            *extra).strip().splitlines()[-1])
        results[label] = report
    return results


# ---------------------------------------------------------------------------------- data

def stage(source: Path, target: Path) -> None:
    """Copy the Wikipedia sample and GLUE SST-2/CoLA into `target` (benchmarks/data)."""
    parts = {"enwiki": source / "enwiki-2015-wikiextractor-sample",
             "glue/SST-2": source / "glue" / "SST-2", "glue/CoLA": source / "glue" / "CoLA"}
    for name, src in parts.items():
        if not src.is_dir():
            sys.exit(f"gpu_check: {src} not found (give --from DIR, the data folder)")
        shutil.rmtree(target / name, ignore_errors=True)
        shutil.copytree(src, target / name)
    print(f"staged {', '.join(parts)} into {target}")


def synthetic_data(folder: Path) -> Path:
    """A tiny corpus and GLUE-layout SST-2 / CoLA files, for smoke runs without data."""
    rng = random.Random(0)
    nouns = "cat dog bird king river city garden ship teacher doctor".split()
    adjs = "small large red old young quiet bright happy dark good bad".split()

    def sentence() -> tuple[str, int]:
        adj = rng.choice(adjs)
        return f"the {adj} {rng.choice(nouns)} sees the {rng.choice(nouns)} .", \
            int(adj in ("good", "happy", "bright"))

    text = folder / "enwiki" / "corpus.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("\n\n".join(" ".join(sentence()[0] for _ in range(8))
                                for _ in range(400)) + "\n")
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
    lines = [f"gpu_check ({results['mode']}), {results.get('elapsed_s', 0):.0f}s"]
    env = steps.get("env", {}).get("result") or {}
    if env:
        lines.append(f"  {env.get('name', env.get('device'))}, torch {env['torch']}, "
                     f"transformers {env.get('transformers')}, matmul peak "
                     f"{env['matmul_peak_tflops']} TFLOP/s ({env['dtype']})")
    lines.append("  | bench | bertforge tok/s (MFU) | compiled | transformers best | ratio |")
    for name, record in steps.items():
        if not name.startswith("bench-"):
            continue
        r = record.get("result")
        if not r:
            lines.append(f"  | {name[6:]} | {_why(record)} | | | |")
            continue
        eager = r["bertforge"][0]
        compiled = next((x for x in r["bertforge"] if "compiled" in x["name"]), None)
        hf = r.get("best_transformers", {})
        lines.append(f"  | {name[6:]} | {eager['tokens_per_s']:,.0f} "
                     f"({100 * eager['mfu']:.1f}%) | "
                     + (f"{compiled['tokens_per_s']:,.0f} ({100 * compiled['mfu']:.1f}%)"
                        if compiled else "-")
                     + f" | {hf.get('tokens_per_s', 0):,.0f} {hf.get('name', '')} | "
                     f"{r.get('speedup', 0):.2f}x |")
    for name in ("tests", "profile"):
        record = steps.get(name, {})
        summary = (record.get("result") or {}).get("summary") if name == "tests" else None
        lines.append(f"  {name}: {'ok' if record.get('ok') else _why(record)}"
                     + (f" ({summary})" if summary else ""))
    pre = steps.get("pretrain", {})
    if pre.get("ok"):
        p = pre["result"]
        e = p["evaluate"]
        lines.append(f"  pretrain: {p['step']} steps, {p['tokens']:,} tokens, "
                     f"{p['tokens_per_s']:,.0f} tok/s; held-out MLM loss {e['mlm_loss']:.3f} "
                     f"vs unigram {e['unigram_baseline_loss']:.3f}")
    else:
        lines.append(f"  pretrain: {_why(pre)}")
    glue = steps.get("glue", {})
    if glue.get("ok"):
        for label, report in glue["result"].items():
            scores = ", ".join(f"{task} {r['score']:.3f}" for task, r in report["tasks"].items())
            lines.append(f"  glue {label}: {scores}")
    else:
        lines.append(f"  glue: {_why(glue)}")
    return "\n".join(lines)


def _why(record: dict[str, Any]) -> str:
    return record.get("skipped") or record.get("error") or "not run"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--out", type=Path, help="directory for results.json, log.txt and runs")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="holds enwiki/ and glue/{SST-2,CoLA} (default: benchmarks/data)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, any device (the CPU included): checks the script")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default: 420; 300 with --smoke)")
    p.add_argument("--stage", action="store_true", help="copy the data into --data, then stop")
    p.add_argument("--from", dest="source", type=Path, default=SHARED,
                   help="with --stage: the data folder to copy from (default: ../shared/data)")
    args = p.parse_args()
    if args.stage:
        stage(args.source, args.data)
        return 0
    if args.out is None:
        p.error("give --out DIR (or --stage)")
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.budget or (300.0 if args.smoke else 420.0), args.smoke)
    sys.path.insert(0, str(ROOT))
    data = args.data
    if not (data / "enwiki").is_dir() or not (data / "glue").is_dir():
        if not args.smoke:
            sys.exit(f"gpu_check: no data in {data}; run `python benchmarks/gpu_check.py "
                     f"--stage` where the data is, then carry benchmarks/data")
        data = synthetic_data(args.out / "synthetic")

    check.step("env", 5, lambda: env_step(check))
    check.step("tests", 60, lambda: tests_step(check))
    for name, preset, batch, seq_len, ours, hf in (BENCH_SMOKE if args.smoke else BENCH_GPU):
        check.step(f"bench-{name}", 40 if not (ours or hf) else 80,
                   lambda: bench_step(check, name, preset, batch, seq_len, ours, hf))
    check.step("profile", 15, lambda: profile_step(check))
    check.step("pretrain", 30 if args.smoke else 200, lambda: pretrain_step(check,
                                                                           data / "enwiki"))
    check.step("glue", 30 if args.smoke else 60, lambda: glue_step(check, data / "glue"))
    check.save()
    text = table(check.results)
    (args.out / "table.txt").write_text(text + "\n")
    check.log(text)
    return 0 if all(r.get("ok") for r in check.results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
