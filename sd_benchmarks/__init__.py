"""Benchmarks of sam_diagnostics: per-example norms, optimizer steps and probes.

Run ``python -m sd_benchmarks.run`` (``--quick`` for a fast smoke run, ``--help`` for options).
"""
