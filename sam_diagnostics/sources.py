"""Data sources for :func:`~sam_diagnostics.data.load_dataset`: a registry, and the built-ins.

A source is one function ``source(n_samples, data_dir)`` returning ``(x_train, y_train,
ids_train, x_test, y_test, ids_test, num_classes)`` (float inputs normalized with training-pool
statistics, integer labels, stable integer ids). Adding a data set = one function and
``@register_source("name")``; the CLI's ``--dataset`` choices and ``TrainConfig`` follow the
registry. Sources never change the caller's random generators.

Examples
--------
>>> from sam_diagnostics.sources import dataset_names
>>> dataset_names()
('digits', 'mnist1d', 'gaussian', 'cifar10')
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from os import PathLike
from pathlib import Path

import numpy as np

__all__ = ["register_source", "unregister_source", "dataset_names"]

#: Fixed seed of the data themselves (train/test split of digits, samples of the Gaussian
#: mixture): the noise seed never changes which examples exist or what the test set is.
DATA_SEED = 0

#: Dimension, mean norm and default training-pool size of the ``"gaussian"`` toy.
GAUSSIAN_DIM = 20
GAUSSIAN_MEAN_NORM = 2.0
GAUSSIAN_TRAIN_SIZE = 1000
GAUSSIAN_TEST_SIZE = 1000

CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
_CIFAR10_RECORD = 1 + 3 * 32 * 32


# --------------------------------------------------------------------------------------------
# Sources: a registry of functions ``source(n_samples, data_dir)`` that return
# (x_train, y_train, ids_train, x_test, y_test, ids_test, num_classes) with float inputs already
# normalized using training-pool statistics. Adding a data set = one function + @register_source.
# --------------------------------------------------------------------------------------------

Source = Callable[[int | None, str | PathLike | None], tuple]
_SOURCES: dict[str, Source] = {}


def register_source(name: str) -> Callable[[Source], Source]:
    """Register a data source under ``name`` for :func:`load_dataset` (a decorator).

    The function takes ``(n_samples, data_dir)`` and returns ``(x_train, y_train, ids_train,
    x_test, y_test, ids_test, num_classes)``: normalized float arrays, integer labels and stable
    integer ids (training rows first). Raise ``ValueError`` for sizes or files it cannot give.

    Examples
    --------
    >>> import numpy as np
    >>> from sam_diagnostics.data import load_dataset
    >>> @register_source("tiny")
    ... def _tiny(n_samples, data_dir):
    ...     x = np.eye(4)
    ...     return x, np.array([0, 1, 0, 1]), np.arange(4), x, np.array([0, 1, 0, 1]), \\
    ...         4 + np.arange(4), 2
    >>> len(load_dataset("tiny", noise=0.0, val_fraction=0.0).train)
    4
    >>> unregister_source("tiny")
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a source name must be a non-empty string, got {name!r}")

    def decorate(fn: Source) -> Source:
        if not callable(fn):
            raise TypeError(f"a source must be callable, got {type(fn).__name__}")
        _SOURCES[name] = fn
        return fn

    return decorate


def unregister_source(name: str) -> None:
    """Remove a source added by :func:`register_source` (built-ins too; use with care)."""
    _SOURCES.pop(name, None)


def dataset_names() -> tuple[str, ...]:
    """Names :func:`load_dataset` accepts now (the built-ins plus registered sources)."""
    return tuple(_SOURCES)


def _checked_size(n_samples: int) -> int:
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer or None, got {n_samples!r}")
    return int(n_samples)


def _take(n_samples: int | None, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The first ``n_samples`` rows of each array (all of them when ``None``)."""
    if n_samples is None:
        return arrays
    n = _checked_size(n_samples)
    return tuple(a[:n] for a in arrays)


@register_source("digits")
def _digits(n_samples: int | None, data_dir=None):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    ids = np.arange(len(y))
    x_tr, x_te, y_tr, y_te, id_tr, id_te = train_test_split(
        x, y, ids, test_size=0.3, random_state=DATA_SEED, stratify=y
    )
    x_tr, y_tr, id_tr = _take(n_samples, x_tr, y_tr, id_tr)
    x_tr, x_te = x_tr / 16.0, x_te / 16.0  # pixel counts 0..16 -> [0, 1]
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std < 1e-8] = 1.0  # always-blank border pixels stay 0
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return x_tr, y_tr, id_tr, x_te, y_te, id_te, 10


@functools.lru_cache(maxsize=1)
def _mnist1d_raw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D built locally (never downloaded), read-only arrays cached per process.

    ``mnist1d.data.make_dataset`` reseeds the global ``numpy`` and ``random`` generators; their
    states are saved and restored around it.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = (
        np.asarray(raw["x"], dtype=np.float64),
        np.asarray(raw["y"], dtype=np.int64),
        np.asarray(raw["x_test"], dtype=np.float64),
        np.asarray(raw["y_test"], dtype=np.int64),
    )
    for a in arrays:
        a.setflags(write=False)
    return arrays


@register_source("mnist1d")
def _mnist1d(n_samples: int | None, data_dir=None):
    x_tr, y_tr, x_te, y_te = _mnist1d_raw()
    id_tr = np.arange(len(y_tr))
    id_te = len(y_tr) + np.arange(len(y_te))
    x_tr, y_tr, id_tr = _take(n_samples, x_tr, y_tr, id_tr)
    mean = x_tr.mean(axis=0)  # centred per feature ...
    scale = (x_tr - mean).std()  # ... and scaled by one global std
    return (x_tr - mean) / scale, y_tr, id_tr, (x_te - mean) / scale, y_te, id_te, 10


@register_source("gaussian")
def _gaussian(n_samples: int | None, data_dir=None):
    n_train = GAUSSIAN_TRAIN_SIZE if n_samples is None else _checked_size(n_samples)
    mu = np.full(GAUSSIAN_DIM, GAUSSIAN_MEAN_NORM / math.sqrt(GAUSSIAN_DIM))

    def draw(n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([DATA_SEED, stream])
        y = rng.permutation(np.arange(n) % 2)  # balanced classes
        x = (2 * y[:, None] - 1) * mu + rng.standard_normal((n, GAUSSIAN_DIM))
        return x, y

    x_tr, y_tr = draw(n_train, 0)
    x_te, y_te = draw(GAUSSIAN_TEST_SIZE, 1)  # own stream: the test set ignores n_samples
    id_tr = np.arange(n_train)
    id_te = n_train + np.arange(GAUSSIAN_TEST_SIZE)
    return x_tr, y_tr, id_tr, x_te, y_te, id_te, 2


def _cifar10_dir(data_dir: str | PathLike | None) -> Path:
    hint = (
        "cifar10 needs the official binary version (cifar-10-binary.tar.gz, files "
        f"{', '.join(CIFAR10_TRAIN_FILES)}, {CIFAR10_TEST_FILE}); pass --data-dir "
        "(data_dir=...) pointing at the folder that holds them"
    )
    if data_dir is None:
        raise ValueError(f"{hint}; no data directory was given")
    root = Path(data_dir).expanduser()
    needed = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    for candidate in (root, root / "cifar-10-batches-bin"):
        if all((candidate / f).is_file() for f in needed):
            return candidate
    missing = [f for f in needed if not (root / f).is_file()]
    raise ValueError(f"{hint}; missing in {str(root)!r}: {', '.join(missing)}")


def _read_cifar10_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one official CIFAR-10 binary file: 3073-byte records (label byte + CHW pixels)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR10_RECORD:
        raise ValueError(
            f"{str(path)!r} is not a CIFAR-10 binary file: {raw.size} bytes is not a positive "
            f"multiple of the {_CIFAR10_RECORD}-byte record"
        )
    records = raw.reshape(-1, _CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise ValueError(f"{str(path)!r}: label byte {labels.max()} is not a CIFAR-10 class")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


@register_source("cifar10")
def _cifar10(n_samples: int | None, data_dir: str | PathLike | None):
    root = _cifar10_dir(data_dir)
    parts = [_read_cifar10_file(root / f) for f in CIFAR10_TRAIN_FILES]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar10_file(root / CIFAR10_TEST_FILE)
    id_tr = np.arange(len(y_tr))
    id_te = len(y_tr) + np.arange(len(y_te))
    x_tr, y_tr, id_tr = _take(n_samples, x_tr, y_tr, id_tr)
    # per-channel statistics of the training pool, accumulated in float64
    mean = x_tr.mean(axis=(0, 2, 3), dtype=np.float64) / 255.0
    std = np.sqrt(
        np.maximum(np.square(x_tr, dtype=np.float64).mean(axis=(0, 2, 3)) / 255.0**2 - mean**2, 0.0)
    )
    std[std < 1e-8] = 1.0

    def normalize(x: np.ndarray) -> np.ndarray:
        out = x.astype(np.float32) / np.float32(255.0)
        out -= mean.astype(np.float32)[None, :, None, None]
        out /= std.astype(np.float32)[None, :, None, None]
        return out

    return normalize(x_tr), y_tr, id_tr, normalize(x_te), y_te, id_te, 10


