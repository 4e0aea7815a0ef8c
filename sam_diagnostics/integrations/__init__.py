"""Integrations with training frameworks (optional extras).

- :mod:`sam_diagnostics.integrations.lightning`: a PyTorch Lightning ``Callback``
  (``pip install sam-diagnostics[lightning]``).
- :mod:`sam_diagnostics.integrations.hf`: a Hugging Face ``transformers.Trainer`` callback
  (``pip install sam-diagnostics[hf]``).

Both record into the store schema of :class:`~sam_diagnostics.Recorder` and can mirror the
per-record live scalars (:mod:`sam_diagnostics.live`) to TensorBoard and to the framework's
own loggers.
"""
