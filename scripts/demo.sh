#!/usr/bin/env bash
# The end-to-end demo behind `make demo`: every stage of the pipeline, each timed.
#   DEMO_CORPUS  text to pretrain on (file, directory or glob)
#   DEMO_BUDGET  pretraining wall-clock budget (e.g. 10m, 90s)
#   DEMO_OUT     where the tokenizer, shards, run and export go; an earlier demo there is
#                kept, and this one goes to DEMO_OUT-2 (or -3, ...: the first free name)
set -euo pipefail
BIN=${BIN:-.venv/bin}
CORPUS=${DEMO_CORPUS:-../shared/data/enwiki-2015-wikiextractor-sample}
BUDGET=${DEMO_BUDGET:-10m}
OUT=${DEMO_OUT:-runs/demo}
bf="$BIN/bertforge"

# A quoted '~/corpus/*.txt' arrives with its ~ as it is (no shell expands a quoted ~), so a
# leading ~ is expanded here, for the check below and for bertforge.
home() {
    case $1 in
        "~") echo "$HOME" ;;
        "~/"*) echo "$HOME/${1#"~/"}" ;;
        *) echo "$1" ;;
    esac
}
CORPUS=$(home "$CORPUS")
OUT=$(home "$OUT")
OUT=${OUT%/}  # runs/demo/ -> runs/demo, whose next free name is runs/demo-2

if ! compgen -G "$CORPUS" >/dev/null; then
    echo "demo: no corpus at '$CORPUS'." >&2
    echo "demo: point DEMO_CORPUS at your text (files, a directory or a glob), e.g." >&2
    echo "        make demo DEMO_CORPUS='~/corpus/*.txt'" >&2
    exit 2
fi

# Never delete an earlier demo: a non-empty DEMO_OUT is kept and this run goes beside it.
kept=""
if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    kept=$OUT
    n=2
    while [ -n "$(ls -A "$OUT-$n" 2>/dev/null)" ]; do n=$((n + 1)); done
    OUT="$OUT-$n"
fi

stage() { echo; echo "== $1"; }
timed() { local t0=$SECONDS; "$@"; echo "   ($(( SECONDS - t0 ))s)"; }

mkdir -p "$OUT"
if [ -n "$kept" ]; then
    echo "bertforge demo: $kept holds an earlier demo, kept; this one writes to $OUT"
fi
echo "bertforge demo: corpus $CORPUS, budget $BUDGET, output $OUT"

stage "1/6 tokenizer: WordPiece, 30522 tokens, lowercase"
timed "$bf" tokenizer "$CORPUS" --out "$OUT/tokenizer" --vocab-size 30522

stage "2/6 prepare: token shards of 128 tokens, 2% of documents held out"
timed "$bf" prepare "$CORPUS" --tokenizer "$OUT/tokenizer" --out "$OUT/data" --seq-len 128 \
    --valid-fraction 0.02

# A short budget favours many small steps, a high learning rate and no dropout; the
# schedule decays to zero exactly at the deadline.
stage "3/6 pretrain: preset mini for $BUDGET"
timed "$bf" pretrain --data "$OUT/data" --out "$OUT/run" --preset mini \
    --time-budget "$BUDGET" --batch-size 16 --micro-batch-size 16 --lr 1e-3 --warmup-fraction 0.05 \
    --adam-beta2 0.98 --dropout 0 --eval-every 500 --checkpoint-every 1000 --log-every 20

stage "4/6 evaluate on the held-out split"
timed "$bf" evaluate "$OUT/run" --out "$OUT/eval.json"
"$BIN/python" - "$OUT/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"   held-out MLM loss {r['mlm_loss']:.3f} (accuracy {r['mlm_accuracy']:.1%}, "
      f"perplexity {r['perplexity']:.1f}) vs unigram-frequency baseline "
      f"{r['unigram_baseline_loss']:.3f}")
PY

stage "5/6 export to Hugging Face format"
timed "$bf" export "$OUT/run" --out "$OUT/hf"

stage "6/6 fill-mask"
"$bf" fill-mask "$OUT/hf" "The capital of France is [MASK]."
"$bf" fill-mask "$OUT/hf" "He was born in [MASK] and studied law."

echo
echo "demo done: run in $OUT/run, Hugging Face model in $OUT/hf"
