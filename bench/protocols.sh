#!/usr/bin/env bash
# Both evaluation protocols on every shipped benchmark (bench/RESULTS.md, "Both protocols on every
# benchmark"): the embedded base model and one trained LoRA, the first 200 questions of each benchmark,
# `generate` (the paper's) on all of them and `loglikelihood` (lm-eval's multiple choice) on those with
# options. Benchmarks are read from ../shared/datasets/eval (or $WORKBENCH_EVAL_DIR).
#
#   WORKBENCH_HOME=/tmp/protocols bash bench/protocols.sh             # trains the LoRA first (200 steps)
#   WORKBENCH_HOME=/work/run16_home TARGET=1 bash bench/protocols.sh  # a LoRA job already in that home
set -euo pipefail
: "${WORKBENCH_HOME:?set WORKBENCH_HOME to the folder of this run}"
export WORKBENCH_HOME
mkdir -p "$WORKBENCH_HOME"
PY=${PY:-.venv/bin/python}
J="$PY -m jobs"
GENERATE='["AddSub", "MultiArith", "SingleEq", "AQuA", "ARC-Easy", "boolq", "piqa", "builtin:math"]'
CHOICES='["AQuA", "ARC-Easy", "boolq", "piqa"]'

spec() {  # spec PROTOCOL BENCHMARKS -> a spec file for an evaluate job
  local file="$WORKBENCH_HOME/eval_$1.json"
  cat > "$file" <<EOF
{"model": {"name": "smollm2-135m-instruct"},
 "adapter": {"method": "lora", "settings": {"r": 16, "alpha": 32.0, "targets": ["q", "k", "v", "up", "down"]}},
 "data": {"source": "builtin:math", "template": "alpaca"},
 "train": {"max_steps": 200, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 10,
           "log_every": 10, "seed": 42},
 "eval": {"benchmarks": $2, "limit": 200, "max_new_tokens": 256, "batch_size": 64, "protocol": "$1"}}
EOF
  echo "$file"
}

GEN=$(spec generate "$GENERATE")
LL=$(spec loglikelihood "$CHOICES")
if [ -z "${TARGET:-}" ]; then
  TARGET=$($J submit "$GEN" --name "lora builtin:math")  # trains, then runs the generate evaluations
else
  $J submit "$GEN" --kind evaluate --target "$TARGET" --name "lora generate"
fi
$J submit "$LL" --kind evaluate --target "$TARGET" --name "lora loglikelihood"
$J submit "$GEN" --kind evaluate --name "base generate"
$J submit "$LL" --kind evaluate --name "base loglikelihood"
$J worker --until-idle
$J compare
