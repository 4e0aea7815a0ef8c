#!/usr/bin/env bash
# Set up (CPU torch first, then the package) and run the quick label-noise study:
# MNIST-1D, MLP, 30% label noise, SGD / 1-SAM / L-SAM / J-SAM / regularized SGD, 3 seeds,
# 60 epochs, rho and gamma fixed (no tuning); a few minutes on 2 CPU cores.
# Writes runs (zarr + netCDF), a report with paired 95% intervals and figures to ${1:-study-out}.
# The full protocol (tuning, 5 fresh seeds, adaptive regularizer, ablations) is resumable by stage:
#   python analyses/label_noise.py --out study-out/full --docs docs [--settings ...] [--stage ...]
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
python analyses/label_noise.py --quick --out "${1:-study-out}"
