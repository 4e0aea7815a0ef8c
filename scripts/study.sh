#!/usr/bin/env bash
# Set up (CPU torch first, then the package) and run the quick label-noise study:
# MNIST-1D, MLP, 30% label noise, SGD / 1-SAM / L-SAM / J-SAM / regularized SGD, 3 seeds.
# Writes runs (zarr + netCDF), a report and figures to ${1:-study-out}.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
python analyses/label_noise.py --quick --out "${1:-study-out}"
