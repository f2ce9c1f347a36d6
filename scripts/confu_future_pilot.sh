#!/usr/bin/env bash
# The ConFu pilot of BENCHMARKS.md ("ConFu's future prediction"): can f carry signal, does the draft read it, and
# does ConFu then beat an EAGLE-3 draft trained on the same data for the same number of tokens?
#
#   1. ShareGPT prompts (`confu data sharegpt`, deduplicated against our prompts and Spec-Bench when QUESTIONS
#      names its question file), answered by the target greedily; `regenerate` writes the shortest prompts
#      first, so the first SG_TRAIN records are the same on every machine however far it got
#   2. from the shipped ConFu draft: f alone (--stage future), then the draft learning to read it
#      (--future-logits), with the body nearly frozen (A) or at the control's lr (D)
#   3. the equal-budget control: the shipped EAGLE-3 draft continued on the same data (B)
#   4. teacher-forced tau with and without f, probe-future diagnostics, and tau in real decoding on our prompts
#
# Every training stage resumes (rerun the script); outputs go to $RUN, outside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFU=${CONFU:-.venv/bin/confu}
RUN=${RUN:-runs/confu-pilot}
SHAREGPT=${SHAREGPT:-2400}   # ShareGPT conversations the target answers (hours on 2 cores; the pilot used 64)
SG_TRAIN=${SG_TRAIN:-64}     # the first records regenerated: the pilot's data
STEPS=${STEPS:-60}
mkdir -p "$RUN"
resume() { [ -d "$1/checkpoint" ] && echo --resume || true; }

$CONFU data sharegpt --out "$RUN/sharegpt.jsonl" --exclude data/eval_prompts.txt ${QUESTIONS:+"$QUESTIONS"}
# regenerate resumes on its own; the pilot needs only the first SG_TRAIN records, so stop early if you like
$CONFU data regenerate --input "$RUN/sharegpt.jsonl" --out "$RUN/regen.jsonl" --limit "$SHAREGPT" \
  --batch-size 32 --max-new-tokens 256
head -n "$SG_TRAIN" "$RUN/regen.jsonl" > "$RUN/train.jsonl"
$CONFU data prepare --input "$RUN/train.jsonl" --out "$RUN/data" --max-len 768

COMMON=(--data "$RUN/data" --batch-tokens 1536 --max-len 768 --ttt-steps 6 --eval-fraction 0.1 --eval-every 20
        --save-every 20 --no-progress)
FUTURE=(--future-loss 1 --future-ahead 2 --anchors 64)
run() {  # run NAME [confu train FLAGS...]
  local name=$1; shift
  OMP_NUM_THREADS=1 $CONFU train --out "$RUN/$name" "${COMMON[@]}" "$@" $(resume "$RUN/$name") \
    > "$RUN/$name.log" 2>&1
}
run future-f --method confu --init drafts/smollm2-135m-confu --stage future "${FUTURE[@]}" --steps "$STEPS" \
  --lr 3e-7 --aux-lr-mult 10000
run confu-A --method confu --init "$RUN/future-f" --future-logits "${FUTURE[@]}" --replicate 0 --steps "$STEPS" \
  --lr 3e-7 --aux-lr-mult 10000
run confu-D --method confu --init "$RUN/future-f" --future-logits "${FUTURE[@]}" --replicate 0 \
  --steps $((2 * STEPS)) --lr 2e-4 --aux-lr-mult 15
run eagle3-B --method eagle3 --init drafts/smollm2-135m-eagle3 --steps $((2 * STEPS)) --lr 2e-4

EVAL=(--data "$RUN/data" --batch-tokens 1536 --max-len 768 --ttt-steps 6 --eval-fraction 0.1)
for draft in drafts/smollm2-135m-eagle3 drafts/smollm2-135m-confu "$RUN/confu-A" "$RUN/confu-D" "$RUN/eagle3-B"; do
  $CONFU evaluate --draft "$draft" "${EVAL[@]}" | tail -n 1
done
for draft in "$RUN/confu-A" "$RUN/confu-D"; do
  $CONFU evaluate --draft "$draft" --zero-future "${EVAL[@]}" | tail -n 1
done
for draft in drafts/smollm2-135m-confu "$RUN/future-f" "$RUN/confu-A"; do
  $CONFU probe-future --draft "$draft" "${EVAL[@]}" --out "$RUN/probe-$(basename "$draft").json" > /dev/null
done
$CONFU bench --target smollm2-135m --questions data/eval_prompts.txt --temperatures 0 --tree-nodes 16 --depth 6 \
  --topk 8 --max-new-tokens 128 --warmup 0 --no-progress --out "$RUN/decode" \
  --methods "eagle3:drafts/smollm2-135m-eagle3=EAGLE-3,confu:$RUN/confu-A=ConFu-A"
