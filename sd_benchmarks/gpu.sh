#!/usr/bin/env bash
# On a machine with a CUDA GPU and nothing but this repository: run the CUDA-marked tests (values
# on the GPU equal the CPU float64 reference to the dtype's tolerance) and the GPU benchmark
# table, in well under 8 minutes. Writes gpu-tests.log and gpu-bench.md (or into $OUT if set).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
# install what is missing when a package index is reachable; the library itself runs from here
for pkg in xarray seaborn sklearn pytest hypothesis; do
  "$PY" -c "import $pkg" 2>/dev/null || "$PY" -m pip install -q "$pkg" || true
done
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
timeout 240 "$PY" -m pytest tests/test_cuda.py -m cuda -q -p no:cacheprovider -rs 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
timeout 300 "$PY" -m sd_benchmarks.gpu --reps 20 --out "$out/gpu-bench.md"
bench=$?
echo "tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
