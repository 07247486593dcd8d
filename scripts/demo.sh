#!/usr/bin/env bash
# The end-to-end demo behind `make demo`: every stage of the pipeline, each timed.
#   DEMO_CORPUS   text to pretrain on (file, directory or glob); default: the Wikipedia
#                 sample shipped in data/, with its shipped tokenizer
#   DEMO_CORPUS_OPTIONS  corpus flags for tokenizer and prepare (e.g. --one-doc-per-line)
#   DEMO_STEPS    training steps (the demo is defined by steps: the same model everywhere)
#   DEMO_BUDGET   a training-time budget instead (e.g. 10m): as many steps as the machine makes
#   DEMO_VOCAB    WordPiece vocabulary trained on a corpus of your own
#   DEMO_OUT      where the tokenizer, shards and run go. An unfinished demo there with the
#                 same settings is continued (run `make demo` again after an interruption);
#                 a finished one, or another's, is kept and this one goes to DEMO_OUT-2, ...
set -euo pipefail
BIN=${BIN:-.venv/bin}
SAMPLE=data/enwiki-2015-sample.txt.xz
SAMPLE_TOKENIZER=data/enwiki-2015-sample-tokenizer
CORPUS=${DEMO_CORPUS:-$SAMPLE}
CORPUS_OPTIONS=${DEMO_CORPUS_OPTIONS:-}
STEPS=${DEMO_STEPS:-3600}
BUDGET=${DEMO_BUDGET:-}
VOCAB=${DEMO_VOCAB:-8192}
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

# What defines this demo: an unfinished demo with the same settings is continued.
if [ -n "$BUDGET" ]; then length="budget $BUDGET"; else length="$STEPS steps"; fi
settings="corpus=$CORPUS options=$CORPUS_OPTIONS length=$length vocab=$VOCAB"

# Never delete an earlier demo: DEMO_OUT, DEMO_OUT-2, ... in turn, the first that is empty
# or holds this demo unfinished.
base=$OUT
n=1
while [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; do
    if [ ! -e "$OUT/demo.done" ] && [ "$(cat "$OUT/demo.settings" 2>/dev/null)" = "$settings" ]; then
        echo "bertforge demo: continuing the unfinished demo in $OUT"
        break
    fi
    n=$((n + 1))
    OUT="$base-$n"
done
if [ "$OUT" != "$base" ] && [ ! -e "$OUT/demo.settings" ]; then
    echo "bertforge demo: $base holds an earlier demo, kept; this one writes to $OUT"
fi
mkdir -p "$OUT"
echo "$settings" > "$OUT/demo.settings"
echo "bertforge demo: corpus $CORPUS, $length, output $OUT"

stage() { echo; echo "== $1"; }
timed() { local t0=$SECONDS; "$@"; echo "   ($(( SECONDS - t0 ))s)"; }
quiet() { "$@" >/dev/null; }  # a command's result on stdout (a path, JSON): the demo says it

stage "1/5 tokenizer: WordPiece, lowercase"
if [ -f "$OUT/tokenizer/tokenizer.json" ]; then
    echo "   done earlier: $OUT/tokenizer"
elif [ "$CORPUS" = "$SAMPLE" ] && [ -z "$CORPUS_OPTIONS" ]; then
    # Training WordPiece is not bit-reproducible (the ids of equal-count tokens change from
    # run to run, even on one thread), so the sample comes with the vocabulary trained on it.
    cp -r "$SAMPLE_TOKENIZER" "$OUT/tokenizer"
    echo "   the sample's own tokenizer ($SAMPLE_TOKENIZER: bertforge tokenizer $SAMPLE --vocab-size 8192)"
else
    # shellcheck disable=SC2086  # CORPUS_OPTIONS is a list of flags
    timed quiet "$bf" tokenizer "$CORPUS" $CORPUS_OPTIONS --out "$OUT/tokenizer" \
        --vocab-size "$VOCAB"
fi
if [ -f "$OUT/tokenizer/vocab.txt" ]; then  # the real size: a small corpus gives fewer
    echo "   $(wc -l < "$OUT/tokenizer/vocab.txt" | tr -d ' ') tokens"
fi

stage "2/5 prepare: token shards of 128 tokens, 2% of documents held out"
if [ -f "$OUT/data/manifest.json" ]; then
    echo "   done earlier: $OUT/data"
else
    # shellcheck disable=SC2086
    timed quiet "$bf" prepare "$CORPUS" $CORPUS_OPTIONS --tokenizer "$OUT/tokenizer" \
        --out "$OUT/data" --seq-len 128 --valid-fraction 0.02
fi

# The short-run recipe (benchmarks/results/demo_plateau.json): a mask rate of 0.4, a
# vocabulary sized to the corpus, many small steps at a high learning rate, no dropout,
# and a warmup counted in steps.
if [ -n "$BUDGET" ]; then
    length_flags=(--time-budget "$BUDGET" --warmup-fraction 0.05)
else
    length_flags=(--max-steps "$STEPS" --warmup-steps $(( STEPS / 20 > 100 ? STEPS / 20 : 100 )))
fi
stage "3/5 pretrain: preset tiny for $length (exported to Hugging Face format at the end)"
if [ -f "$OUT/run/hf/config.json" ]; then
    echo "   done earlier: $OUT/run"
else
    resume=()
    if [ -d "$OUT/run/checkpoints" ] && [ -n "$(ls -A "$OUT/run/checkpoints")" ]; then
        resume=(--resume)
        echo "   continuing from its last checkpoint"
    else
        rm -rf "$OUT/run"  # stopped before its first checkpoint: nothing to keep
    fi
    timed quiet "$bf" pretrain --data "$OUT/data" --out "$OUT/run" --preset tiny "${length_flags[@]}" \
        --batch-size 16 --micro-batch-size 16 --lr 2e-3 --mask-rate 0.4 --adam-beta2 0.98 \
        --dropout 0 --eval-every 250 --checkpoint-every 250 --log-every 50 "${resume[@]}"
fi

stage "4/5 evaluate on the held-out split"
timed quiet "$bf" evaluate "$OUT/run" --out "$OUT/eval.json"
"$BIN/python" - "$OUT/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
loss, base = r["mlm_loss"], r["unigram_baseline_loss"]
gap = base - loss
print(f"   held-out MLM loss {loss:.3f} (accuracy {r['mlm_accuracy']:.1%}, "
      f"perplexity {r['perplexity']:.1f}) vs unigram-frequency baseline {base:.3f}")
verdict = ("yes" if gap >= 0.3 else "barely" if gap > 0 else "no")
where = f"{gap:.3f} nats below" if gap >= 0 else f"{-gap:.3f} nats above"
print(f"   learned beyond word frequencies: {verdict} (held-out loss {where} the baseline)")
PY

stage "5/5 fill-mask"
"$bf" fill-mask "$OUT/run/hf" "The capital of France is [MASK]."
"$bf" fill-mask "$OUT/run/hf" "He was born in [MASK] and studied law."

touch "$OUT/demo.done"
echo
echo "demo done: run in $OUT/run (plots in $OUT/run/report), Hugging Face model in $OUT/run/hf"
