#!/usr/bin/env bash
# Set up (CPU torch first, then the package with its dev extras) and run lint + the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,lightning,hf]"
python -m ruff check sam_diagnostics analyses sd_benchmarks examples scripts tests
python -m pytest tests -p no:cacheprovider
