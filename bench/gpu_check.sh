#!/usr/bin/env bash
# The GPU check of issue 15 as one run on one GPU, in under 8 minutes, with nothing downloaded:
# the tests marked `cuda`, then bench/gpu_vs_peft.py's table (ours against transformers.Trainer + PEFT,
# LoRA, DoRA and QLoRA on SmolLM2-135M's and a 1.1B LLaMA's config with random weights).
#
#   bash bench/gpu_check.sh [WHEELS]       WHEELS: a folder of wheels to install first
#                                          (default $BNB_WHEELS, else bench/wheels)
#
# The GPU machine has torch, transformers, accelerate and peft but no bitsandbytes, no SQLAlchemy and no
# network, so their wheels travel with the repo (not committed; bench/wheels is git-ignored locally):
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d bench/wheels \
#     bitsandbytes==0.50.2 sqlalchemy==2.1.9
# bitsandbytes is QLoRA's (without it the QLoRA tests skip and the QLoRA rows say so); SQLAlchemy only
# lets test files that import jobs' helpers be collected. Nothing else of the web app is imported.
# The last line is bench/gpu_vs_peft.py's `name: number`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${1:-${BNB_WHEELS:-bench/wheels}}
SITE=$(mktemp -d)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl \
    && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "# no wheels in $WHEELS: the QLoRA tests and rows skip, and so do test files that import jobs"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WORKBENCH_HOME="$SITE/home"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "# nvidia-smi failed"
"$PY" - <<'PYEOF'
from importlib import metadata
versions = []
for name in ("torch", "transformers", "accelerate", "peft", "bitsandbytes"):
    try:
        versions.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        versions.append(f"{name} missing")
print("#", ", ".join(versions))
PYEOF
status=0
echo "== tests marked cuda"
# Only the files that hold such tests (collecting every file would import gradio); one that cannot be
# imported here is reported and the others still run.
mapfile -t FILES < <(grep -l "pytest.mark.cuda" tests/test_*.py)
timeout 200 "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider --continue-on-collection-errors "${FILES[@]}" \
  || status=1
echo "== ours against transformers.Trainer + PEFT"
timeout 330 "$PY" bench/gpu_vs_peft.py --steps 5 || status=1
exit $status
