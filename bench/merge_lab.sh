#!/usr/bin/env bash
# The merge lab's real run (bench/RESULTS.md, "Merging two specialists"): two LoRA adapters of the embedded
# model, one trained on the built-in problems that only add and subtract, one on those that only multiply
# and divide; merged by linear, TIES and DARE-TIES; a weight search of the linear mixture scored on 40
# new problems (core.mathgen with seed 2: in neither built-in set); every model evaluated on
# the whole built-in evaluation set and on its two single-kind parts.
#
#   WORKBENCH_HOME=/tmp/merge-lab bash bench/merge_lab.sh        # about an hour on 2 cores
#   WORKBENCH_HOME=/tmp/merge-lab PARENTS="1 2" bash bench/merge_lab.sh   # again, from the trained parents
set -euo pipefail
: "${WORKBENCH_HOME:?set WORKBENCH_HOME to an empty folder for this run}"
export WORKBENCH_HOME
mkdir -p "$WORKBENCH_HOME"
PY=${PY:-.venv/bin/python}
J="$PY -m jobs"
STEPS=${STEPS:-200}
EVAL="builtin:math,builtin:math?ops=add,sub,builtin:math?ops=mul,div"

# The two parents' specs, and the search's scoring examples (40 new problems: in neither built-in set).
"$PY" - "$WORKBENCH_HOME" "$STEPS" <<'EOF'
import json, sys
from pathlib import Path
home, steps = Path(sys.argv[1]), int(sys.argv[2])
spec = {
    "model": {"name": "smollm2-135m-instruct"},
    "adapter": {"method": "lora", "settings": {"r": 16, "alpha": 32.0, "targets": ["q", "k", "v", "up", "down"]}},
    "data": {"source": "builtin:math", "template": "alpaca", "cutoff_len": 256},
    "train": {"epochs": 3.0, "max_steps": steps, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-3,
              "warmup_steps": 10, "log_every": 10, "seed": 42},
    "eval": {"benchmarks": ["builtin:math", "builtin:math?ops=add,sub", "builtin:math?ops=mul,div"],
             "limit": 0, "max_new_tokens": 256, "batch_size": 100},
}
for name, ops in [("addsub", "add,sub"), ("muldiv", "mul,div")]:
    spec["name"] = f"lora-{name}"
    spec["data"]["source"] = f"builtin:math?ops={ops}"
    (home / f"spec_{name}.json").write_text(json.dumps(spec, indent=1))
from core.mathgen import generate_problems
seen = {r["instruction"] for f in ("math_train", "math_eval") for r in json.loads(Path(f"assets/{f}.json").read_text())}
(home / "val40.json").write_text(json.dumps(generate_problems(40, seed=2, exclude=seen), indent=1))
EOF

if [ -n "${PARENTS:-}" ]; then  # PARENTS="1 2": the parents are trained and evaluated already
  read -r A B <<< "$PARENTS"
else
  A=$($J submit "$WORKBENCH_HOME/spec_addsub.json" --name lora-addsub)
  B=$($J submit "$WORKBENCH_HOME/spec_muldiv.json" --name lora-muldiv)
  $J submit "$WORKBENCH_HOME/spec_addsub.json" --kind evaluate --name base-model
  $J worker --until-idle
fi

$J merge "$A" "$B" --method linear --rank 32 --name "linear 0.5/0.5" --benchmarks "$EVAL"
$J merge "$A" "$B" --method linear --weights 1,1 --rank 32 --name "linear 1/1" --benchmarks "$EVAL"
$J merge "$A" "$B" --method ties --weights 1,1 --density 0.5 --rank 32 --name "ties 1/1 d0.5" --benchmarks "$EVAL"
$J merge "$A" "$B" --method dare_ties --weights 1,1 --drop 0.5 --seed 0 --rank 32 --name "dare_ties 1/1 p0.5" \
  --benchmarks "$EVAL"
S=$($J weight-search "$A" "$B" --method linear --rank 32 --benchmark "$WORKBENCH_HOME/val40.json" --limit 0 \
  --budget 16 --low 0 --high 1.5 --search-seed 0 --name "weight search (linear)")
$J worker --until-idle
$J submit "$WORKBENCH_HOME/spec_addsub.json" --kind evaluate --target "$S" --name "weight search best"
$J worker --until-idle

$J show "$S"
$J compare
