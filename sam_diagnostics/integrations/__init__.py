"""Integrations with training frameworks (optional extras).

- :mod:`sam_diagnostics.integrations.lightning`: a PyTorch Lightning ``Callback``
  (``pip install sam-diagnostics[lightning]``).
"""
