#!/usr/bin/env bash
# Inputs for every notebook from a fresh clone, in about a minute on 2 cores:
#
#   bash notebooks/tiny_inputs.sh DATA_PATH [OUT]      # OUT defaults to logs/notebooks
#
# trains two tiny runs (plain and LayerSkip) on a slice of WikiText-2 at DATA_PATH,
# evaluates them, calibrates DEE on the LayerSkip one, benchmarks it, and then executes
# each notebook against these (papermill) into OUT/executed/. The committed notebooks,
# with the outputs of the real runs, are left as they are. Every step is an ordinary
# command; the numbers of such tiny runs mean nothing, only that each notebook reads
# what the commands write.
set -euo pipefail
: "${1:?usage: bash notebooks/tiny_inputs.sh DATA_PATH [OUT]}"
# Both made absolute before moving to the project's folder, where the commands run.
abspath() { python -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "$1"; }
DATA=$( [ -e "$1" ] && abspath "$1" || echo "$1" )
OUT=$(abspath "${2:-logs/notebooks}")
cd "$(dirname "$0")/.."
mkdir -p "$OUT/executed" "$OUT/results"
CK="$OUT/checkpoints"
DATA_ARGS=("data.path=$DATA" "data.cache_dir=$OUT/cache" "data.max_rows=1000" "data.vocab_size=300")
TINY=(model=l4_d64 model.hidden_size=32 model.intermediate_size=64
      model.max_position_embeddings=128 "checkpoint_root=$CK"
      train.max_steps=150 train.eval_every=50 train.eval_batches=2 train.batch_size=8
      train.seq_len=32 train.warmup_steps=5 train.lr=1e-2 train.bf16=false train.compile=false)

for preset in plain layerskip; do
  # Every exit scores every token: in 150 steps a tiny model learns exits worth exiting at.
  extra=(); [ "$preset" = layerskip ] && extra=(train.exit_token_fraction=1.0 train.e_scale=0.2)
  python -m tinyskip.train "${TINY[@]}" "${DATA_ARGS[@]}" "train=$preset" "run=tiny-$preset" \
    "${extra[@]}"
  python -m tinyskip.evaluate "checkpoint=$CK/tiny-$preset" split=test max_batches=2 \
    "out=$CK/tiny-$preset/eval_test.json"
done

RUN="$CK/tiny-layerskip"
SMALL=("checkpoint=$RUN" n_examples=8 grid=4 prompt_len=8 max_new_tokens=6 delta=0.3 epsilon=0.3)
python -m tinyskip.calibrate "${SMALL[@]}" n_test=4 "out=$OUT/results/tiny-softmax.json"
python -m tinyskip.calibrate "${SMALL[@]}" check_splits=4 test_split=null \
  "out=$OUT/results/tiny-splits.json"
python -m tinyskip.bench "checkpoint=$RUN" n_prompts=2 prompt_len=8 max_new_tokens=6 \
  'draft_layer=[1,2]' 'k=[2,3]' draft_vocab=100 ngram=2 'measure=[softmax]' 'threshold=[0.9,0.5]' \
  "calibration=[$OUT/results/tiny-softmax.json]" "out_dir=$OUT/bench/tiny/sweep"

# Each notebook's parameters (its first cell) pointed at the runs above.
run_notebook() {
  papermill -k python3 --cwd notebooks --no-progress-bar "notebooks/$1.ipynb" \
    "$OUT/executed/$1.ipynb" -y "$2"
}
run_notebook training_curves "{CHECKPOINTS: $CK, RUNS: [tiny-plain, tiny-layerskip]}"
run_notebook exit_quality "{EVALS: {plain: $CK/tiny-plain/eval_test.json, layerskip: $RUN/eval_test.json}}"
run_notebook ablation "{CHECKPOINTS: $CK, VARIANTS: {plain: tiny-plain, layerskip: tiny-layerskip}}"
run_notebook decoding_benchmark "{RESULTS: [$OUT/bench/tiny, $OUT/bench/tiny/sweep]}"
run_notebook dee_calibration "{CALIBRATIONS: [$OUT/results/tiny-softmax.json, $OUT/results/tiny-splits.json], RESULTS: $OUT/bench/tiny/sweep}"
run_notebook real_model "{RESULTS: {sweep: $OUT/bench/tiny/sweep}, EVALS: {plain: $CK/tiny-plain/eval_test.json, layerskip: $RUN/eval_test.json}, RUN: $RUN}"
echo "notebooks executed against tiny runs: $OUT/executed/"
