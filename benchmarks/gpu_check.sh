#!/usr/bin/env bash
# The GPU check in one call on a GPU machine with no registry (issue 14): install tokcomp into that
# machine's Python from this checkout, without downloading anything, then run benchmarks/gpu_check.py.
#
#   make gpu-wheels                          # here, once: the wheels the GPU image lacks, into .whl/
#   bash benchmarks/gpu_check.sh OUT [gpu_check.py options]     # there, with .whl carried along
#
# The GPU image has torch, transformers, triton, pluggy, pytest and PyYAML but not omegaconf (imported by
# the model adapters through tokcomp.config); .whl/ brings it. mlflow, av and fvcore are not needed: the
# check drives tokcomp's pipeline directly and logs nothing to MLflow. Exit status: gpu_check.py's.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT [gpu_check.py options]}
shift
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tokcomp-wheels .whl/*.whl \
    || { echo "gpu_check.sh: installing .whl/ failed"; exit 2; }
  export PYTHONPATH=/tmp/tokcomp-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
# editable, so tokcomp.strategies / tokcomp.models map to strategies/ and models/ as in a development install
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  || { echo "gpu_check.sh: pip install -e . failed (setuptools>=68 and wheel are needed in $PY)"; exit 2; }
export PYTHONUNBUFFERED=1
$PY benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
