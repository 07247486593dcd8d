#!/usr/bin/env bash
# What pretraining bought: fine-tune SST-2 and CoLA (a) from a pretrained run and (b) from
# scratch with the same architecture (`--from-scratch`), time each, print a table.
#
#   scripts/glue_baselines.sh [RUN_DIR] [GLUE_DIR]
#       RUN_DIR   a bertforge run directory or Hugging Face BERT directory (default runs/demo/run)
#       GLUE_DIR  holding SST-2/ and CoLA/ as GLUE distributes them (default ../shared/data/glue)
#
# The defaults suit a mini (4 layers x 256) model on a 2-core CPU, about 15-25 minutes for
# the four runs: lr 1e-4 (small models want more than BERT-base's 2e-5), batch 32, 2 epochs
# of SST-2 and 3 of CoLA, 64 tokens (more than any SST-2 dev or CoLA sentence needs), and
# batches of similar lengths (SST-2 sentences average ~14 tokens; padding each batch to its
# longest costs ~2x). Environment overrides:
#   OUT (default: RUN_DIR's parent/glue-baselines), LR, BATCH, SST2_EPOCHS, COLA_EPOCHS,
#   MAX_LENGTH, LENGTH_GROUPING, MAX_TRAIN_EXAMPLES (0: all; e.g. 200 for a quick check),
#   EXTRA (more flags for every `bertforge finetune`), BIN (default .venv/bin).
set -euo pipefail
RUN=${1:-runs/demo/run}
GLUE=${2:-../shared/data/glue}
BIN=${BIN:-.venv/bin}
OUT=${OUT:-$(dirname "$RUN")/glue-baselines}
LR=${LR:-1e-4}
BATCH=${BATCH:-32}
SST2_EPOCHS=${SST2_EPOCHS:-2}
COLA_EPOCHS=${COLA_EPOCHS:-3}
MAX_LENGTH=${MAX_LENGTH:-64}
LENGTH_GROUPING=${LENGTH_GROUPING:-50}
MAX_TRAIN_EXAMPLES=${MAX_TRAIN_EXAMPLES:-0}
EXTRA=${EXTRA:-}
bf="$BIN/bertforge"

if [ ! -e "$RUN" ]; then
    echo "glue_baselines: no model at '$RUN' (pretrain one first, e.g. make demo)" >&2
    exit 2
fi
for task in SST-2 CoLA; do
    if [ ! -f "$GLUE/$task/train.tsv" ]; then
        echo "glue_baselines: no $GLUE/$task/train.tsv (give the GLUE directory)" >&2
        exit 2
    fi
done

mkdir -p "$OUT"
: > "$OUT/times.tsv"
TIMEFORMAT="   time: %1Rs (user %1Us, sys %1Ss)"
echo "glue_baselines: model $RUN, GLUE $GLUE, output $OUT"
echo "  lr $LR, batch $BATCH, max length $MAX_LENGTH, epochs SST-2 $SST2_EPOCHS / CoLA" \
     "$COLA_EPOCHS, length grouping $LENGTH_GROUPING, train examples ${MAX_TRAIN_EXAMPLES/#0/all}"

for task in sst2 cola; do
    epochs=$SST2_EPOCHS
    [ "$task" = cola ] && epochs=$COLA_EPOCHS
    for init in pretrained scratch; do
        dir="$OUT/$task-$init"
        flags=()
        [ "$init" = scratch ] && flags+=(--from-scratch)
        echo
        echo "== $task, $init"
        rm -rf "$dir"
        t0=$SECONDS
        # shellcheck disable=SC2086  # EXTRA is a list of flags
        time "$bf" finetune "$RUN" --task "$task" --data-dir "$GLUE" --out "$dir" \
            ${flags[@]+"${flags[@]}"} --lr "$LR" --epochs "$epochs" --batch-size "$BATCH" \
            --max-length "$MAX_LENGTH" --length-grouping "$LENGTH_GROUPING" \
            --max-train-examples "$MAX_TRAIN_EXAMPLES" --quiet $EXTRA >/dev/null
        printf '%s\t%s\t%s\n' "$task" "$init" "$(( SECONDS - t0 ))" >> "$OUT/times.tsv"
    done
done

echo
"$BIN/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
names = {"sst2": ("SST-2", "accuracy"), "cola": ("CoLA", "Matthews corr.")}
rows = ["| Task | Metric | Pretrained | From scratch | Gain | Time (pretrained / scratch) |",
        "|---|---|---:|---:|---:|---:|"]
times = {(t, i): int(s) for t, i, s in
         (line.split("\t") for line in (out / "times.tsv").read_text().splitlines())}
for task, (name, metric) in names.items():
    m = {i: json.loads((out / f"{task}-{i}" / "metrics.json").read_text())
         for i in ("pretrained", "scratch")}
    a, b = 100 * m["pretrained"]["score"], 100 * m["scratch"]["score"]
    epochs = f"best epochs {m['pretrained']['best_epoch']:g} / {m['scratch']['best_epoch']:g}"
    rows.append(f"| {name} | {metric} | {a:.1f} | {b:.1f} | {a - b:+.1f} | "
                f"{times[task, 'pretrained']}s / {times[task, 'scratch']}s ({epochs}) |")
print("\n".join(rows))
(out / "summary.md").write_text("\n".join(rows) + "\n")
PY
echo
echo "glue_baselines: done; per-run metrics in $OUT/*/metrics.json, table in $OUT/summary.md"
