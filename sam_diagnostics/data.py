"""Label-noise data sets, built offline.

Everything here is "data in, data out": small pure functions, no global state, and no change to
the caller's random number generators (the global ``random``, ``numpy`` and ``torch`` generators
are left exactly as they were).

Example ids
-----------
Every example carries a stable integer id: its row in the source's full data, training rows first
and test rows after them (for ``"digits"``, the row in :func:`sklearn.datasets.load_digits`).
Ids therefore never change with the noise seed or the validation split, and they are unique
across ``train``, ``val`` and ``test``. Diagnostics stored per example use them as coordinates.

Examples
--------
>>> from sam_diagnostics.data import load_dataset, probe_subset
>>> splits = load_dataset("digits", noise=0.3, seed=0)
>>> len(splits.train) + len(splits.val), len(splits.test)
(1257, 540)
>>> x, label, example_id = splits.train[0]
>>> probe = splits.train.subset(probe_subset(splits.train, 64, seed=0))
>>> len(probe)
64
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .sources import (  # noqa: F401 - re-exported: the registry and the built-in sources
    _SOURCES,
    CIFAR10_TEST_FILE,
    CIFAR10_TRAIN_FILES,
    DATA_SEED,
    GAUSSIAN_DIM,
    GAUSSIAN_MEAN_NORM,
    GAUSSIAN_TEST_SIZE,
    GAUSSIAN_TRAIN_SIZE,
    _mnist1d_raw,
    dataset_names,
    register_source,
    unregister_source,
)

__all__ = [
    "DATASETS",
    "NOISE_MODES",
    "NoisyDataset",
    "Splits",
    "inject_label_noise",
    "load_dataset",
    "probe_subset",
    "register_source",
    "unregister_source",
    "dataset_names",
    "as_noisy_dataset",
]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("digits", "mnist1d", "gaussian", "cifar10")

#: Label-noise models accepted by :func:`inject_label_noise`.
NOISE_MODES: tuple[str, ...] = ("symmetric", "asymmetric")



# --------------------------------------------------------------------------------------------
# Label noise
# --------------------------------------------------------------------------------------------


def inject_label_noise(
    labels: np.ndarray,
    num_classes: int,
    rate: float,
    *,
    mode: str = "symmetric",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt exactly ``round(rate * N)`` labels.

    Parameters
    ----------
    labels : numpy.ndarray
        True labels, integers in ``[0, num_classes)``, shape ``[N]``. Not modified.
    num_classes : int
        Number of classes (at least 2).
    rate : float
        Fraction of examples to corrupt, in ``[0, 1)``. Exactly ``round(rate * N)`` examples
        (Python's ``round``) are flagged, chosen uniformly without replacement.
    mode : {"symmetric", "asymmetric"}
        ``"symmetric"``: each flagged example gets a label drawn uniformly from the
        ``num_classes - 1`` *other* classes (never its true label). ``"asymmetric"``: a fixed
        pair flip ``c -> (c + 1) % num_classes``.
    seed : int
        Seed of the private :func:`numpy.random.default_rng` generator; the global random
        state is never used or changed.

    Returns
    -------
    observed : numpy.ndarray
        int64 labels as a learner sees them, shape ``[N]``.
    is_noisy : numpy.ndarray
        bool mask, ``True`` where ``observed != labels``.

    Examples
    --------
    >>> import numpy as np
    >>> observed, is_noisy = inject_label_noise(np.arange(10) % 3, 3, 0.3, seed=0)
    >>> int(is_noisy.sum())
    3
    >>> bool(np.all(observed[is_noisy] != (np.arange(10) % 3)[is_noisy]))
    True
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    num_classes = int(num_classes)
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)):
        raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
    if not 0.0 <= float(rate) < 1.0:  # also rejects NaN
        raise ValueError(f"rate must be in [0, 1), got {rate!r}")
    if mode not in NOISE_MODES:
        raise ValueError(f"mode must be one of {NOISE_MODES}, got {mode!r}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )

    n = labels.shape[0]
    observed = labels.astype(np.int64, copy=True)
    is_noisy = np.zeros(n, dtype=bool)
    num_noisy = round(float(rate) * n)
    if num_noisy == 0:
        return observed, is_noisy

    rng = np.random.default_rng(seed)
    flagged = rng.choice(n, size=num_noisy, replace=False)
    if mode == "symmetric":
        # a uniform non-zero shift modulo C is a uniform draw from the other C - 1 classes
        shift = rng.integers(1, num_classes, size=num_noisy)
    else:
        shift = np.ones(num_noisy, dtype=np.int64)
    observed[flagged] = (observed[flagged] + shift) % num_classes
    is_noisy[flagged] = True
    return observed, is_noisy


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class NoisyDataset(Dataset):
    """Examples with observed (possibly noisy) labels, their true labels and stable ids.

    Parameters
    ----------
    inputs : torch.Tensor
        float32 inputs, shape ``[N, *input_shape]``.
    labels : torch.Tensor
        int64 observed labels (what the learner trains on), shape ``[N]``.
    true_labels : torch.Tensor
        int64 clean labels, shape ``[N]``.
    is_noisy : torch.Tensor
        bool, ``labels != true_labels``, shape ``[N]``.
    example_ids : torch.Tensor
        int64 stable ids (see the module docstring), shape ``[N]``.
    num_classes : int
        Number of classes.

    Arrays are converted to tensors of the dtypes above on construction.

    Examples
    --------
    >>> import torch
    >>> ds = NoisyDataset(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]),
    ...                   torch.tensor([0, 1, 0, 0]), torch.tensor([False, False, True, False]),
    ...                   torch.arange(4), num_classes=2)
    >>> x, label, example_id = ds[2]
    >>> int(label), int(example_id)
    (1, 2)
    >>> ds.subset([1, 2]).example_ids.tolist()
    [1, 2]
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    true_labels: torch.Tensor
    is_noisy: torch.Tensor
    example_ids: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        self.inputs = torch.as_tensor(self.inputs, dtype=torch.float32)
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        self.true_labels = torch.as_tensor(self.true_labels, dtype=torch.int64)
        self.is_noisy = torch.as_tensor(self.is_noisy, dtype=torch.bool)
        self.example_ids = torch.as_tensor(self.example_ids, dtype=torch.int64)
        self.num_classes = int(self.num_classes)
        n = self.inputs.shape[0]
        for field in ("labels", "true_labels", "is_noisy", "example_ids"):
            value = getattr(self, field)
            if value.shape != (n,):
                raise ValueError(f"{field} must have shape [{n}], got {list(value.shape)}")

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.labels[index], self.example_ids[index]

    def __repr__(self) -> str:
        return (
            f"NoisyDataset(n={len(self)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, noisy={int(self.is_noisy.sum())})"
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.inputs.shape[1:])

    @property
    def noise_rate(self) -> float:
        """Observed fraction of noisy labels (0.0 for an empty set)."""
        return int(self.is_noisy.sum()) / len(self) if len(self) else 0.0

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> NoisyDataset:
        """A new ``NoisyDataset`` with the examples at ``indices`` (positions, not ids)."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        return NoisyDataset(
            inputs=self.inputs[index],
            labels=self.labels[index],
            true_labels=self.true_labels[index],
            is_noisy=self.is_noisy[index],
            example_ids=self.example_ids[index],
            num_classes=self.num_classes,
        )


@dataclass(eq=False)
class Splits:
    """Train/validation/test splits of one noisy data set.

    ``train`` and ``val`` both come from the noisy training pool (noise kept, so ``val`` can be
    used for model selection as a user would); ``test`` has clean labels.
    ``noise_rate``, ``noise_mode`` and ``seed`` record how the splits were made.
    """

    train: NoisyDataset
    val: NoisyDataset
    test: NoisyDataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    noise_rate: float = 0.0
    noise_mode: str = "symmetric"
    seed: int = 0

    def __repr__(self) -> str:
        return (
            f"Splits(name={self.name!r}, train={len(self.train)}, val={len(self.val)}, "
            f"test={len(self.test)}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape}, noise_rate={self.noise_rate}, "
            f"noise_mode={self.noise_mode!r}, seed={self.seed})"
        )


# --------------------------------------------------------------------------------------------
# Public loader
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    *,
    noise: float = 0.3,
    noise_mode: str = "symmetric",
    seed: int = 0,
    val_fraction: float = 0.1,
    data_dir: str | PathLike | None = None,
    n_samples: int | None = None,
) -> Splits:
    """Load a data set, corrupt its training labels and split off a noisy validation set.

    Parameters
    ----------
    name : {"digits", "mnist1d", "gaussian", "cifar10"}
        ``"digits"``: scikit-learn's 8x8 digits (64 features scaled to [0, 1], then standardized
        per feature), fixed stratified 70/30 train/test split. ``"mnist1d"``: MNIST-1D (4,000
        train / 1,000 test, 40 features) built locally, centred per feature and scaled by one
        global standard deviation. ``"gaussian"``: binary mixture ``N(+-mu, I)`` in 20
        dimensions with ``||mu|| = 2`` (labels 0/1, inputs not rescaled) for the linear toy.
        ``"cifar10"``: the official binary CIFAR-10 files in ``data_dir``, inputs
        ``[N, 3, 32, 32]`` normalized per channel. All normalization statistics come from the
        training pool (train + val) only.
    noise : float
        Label-noise rate in ``[0, 1)``; exactly ``round(noise * N)`` training-pool labels are
        corrupted (see :func:`inject_label_noise`).
    noise_mode : {"symmetric", "asymmetric"}
        Noise model, see :func:`inject_label_noise`.
    seed : int
        Seeds the label noise and the train/val split. The examples themselves and the test
        set do not depend on it.
    val_fraction : float
        Fraction of the noisy training pool held out as ``val`` (noise kept), in ``[0, 1)``.
    data_dir : path, optional
        Folder with the CIFAR-10 binary files (or its parent holding ``cifar-10-batches-bin``);
        ignored by the other data sets.
    n_samples : int, optional
        Size of the training pool: the first ``n_samples`` training examples of the source
        (``"gaussian"``: how many to draw, default 1,000). The test set is unchanged.

    Returns
    -------
    Splits
        ``train`` and ``val`` with noisy labels, ``test`` with clean labels; stable example ids.

    Examples
    --------
    >>> splits = load_dataset("gaussian", noise=0.2, n_samples=200, val_fraction=0.0)
    >>> len(splits.train), splits.num_classes, splits.input_shape
    (200, 2, (20,))
    >>> float(splits.train.noise_rate)
    0.2
    """
    if name not in _SOURCES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(_SOURCES)}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float, np.integer, np.floating)):
        raise ValueError(f"noise (the label-noise rate) must be a number in [0, 1), got {noise!r}")
    if not 0.0 <= float(noise) < 1.0:
        raise ValueError(f"noise (the label-noise rate) must be in [0, 1), got {noise!r}")
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
    source = _SOURCES[name](n_samples, data_dir)
    x_pool, y_pool, id_pool, x_test, y_test, id_test, num_classes = source

    observed, is_noisy = inject_label_noise(y_pool, num_classes, noise, mode=noise_mode, seed=seed)
    # inputs are fresh arrays made by the source (no copy, which matters for CIFAR-10); labels
    # and ids are copied so no tensor shares memory with a cached array or with another field
    pool = NoisyDataset(
        inputs=torch.from_numpy(np.ascontiguousarray(x_pool, dtype=np.float32)),
        labels=torch.tensor(observed),
        true_labels=torch.tensor(y_pool, dtype=torch.int64),
        is_noisy=torch.tensor(is_noisy),
        example_ids=torch.tensor(id_pool, dtype=torch.int64),
        num_classes=num_classes,
    )
    test = NoisyDataset(
        inputs=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        labels=torch.tensor(y_test, dtype=torch.int64),
        true_labels=torch.tensor(y_test, dtype=torch.int64),
        is_noisy=torch.zeros(len(y_test), dtype=torch.bool),
        example_ids=torch.tensor(id_test, dtype=torch.int64),
        num_classes=num_classes,
    )

    n = len(pool)
    n_val = round(float(val_fraction) * n)
    # a stream of its own, so the split and the noise draw are independent
    order = np.random.default_rng([seed, 1]).permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return Splits(
        train=pool.subset(train_idx),
        val=pool.subset(val_idx),
        test=test,
        num_classes=num_classes,
        input_shape=pool.input_shape,
        name=name,
        noise_rate=float(noise),
        noise_mode=noise_mode,
        seed=int(seed),
    )


def probe_subset(dataset: NoisyDataset, size: int, *, seed: int = 0) -> np.ndarray:
    """A fixed subset stratified over (is_noisy, true label), for per-example diagnostics.

    Each stratum gets a share of ``size`` proportional to its size (largest remainders), so
    clean and noisy examples appear in proportion; at least one noisy example is included if
    the data set has any (and at least one clean one if it has any and ``size >= 2``).

    Parameters
    ----------
    dataset : NoisyDataset
        The examples to choose from (anything with ``is_noisy`` and ``true_labels``).
    size : int
        Number of examples, ``1 <= size <= len(dataset)``.
    seed : int
        Seed of the private generator; the same seed gives the same subset.

    Returns
    -------
    numpy.ndarray
        Sorted int64 positions into ``dataset`` (use ``dataset.subset(...)`` or
        ``dataset.example_ids[...]``).

    Examples
    --------
    >>> splits = load_dataset("digits", noise=0.3)
    >>> idx = probe_subset(splits.train, 100, seed=0)
    >>> int(splits.train.is_noisy[idx].sum()), round(splits.train.noise_rate, 3)
    (29, 0.296)
    """
    is_noisy = np.asarray(torch.as_tensor(dataset.is_noisy), dtype=bool)
    true_labels = np.asarray(torch.as_tensor(dataset.true_labels), dtype=np.int64)
    n = len(is_noisy)
    if int(size) != size or not 1 <= size <= n:
        raise ValueError(f"size must be an integer in [1, {n}], got {size!r}")
    size = int(size)

    keys = true_labels * 2 + is_noisy  # one key per (true label, is_noisy) stratum
    strata, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    exact = counts * size / n
    quota = np.floor(exact).astype(np.int64)
    remainder = exact - quota
    # largest remainders first; ties broken by stratum order, so the result is deterministic
    for s in np.argsort(-remainder, kind="stable")[: size - quota.sum()]:
        quota[s] += 1

    noisy_stratum = (strata % 2).astype(bool)
    # (noisy strata, needed from size 1), then (clean strata, needed from size 2)
    for group, min_size in ((noisy_stratum, 1), (~noisy_stratum, 2)):
        if group.any() and quota[group].sum() == 0 and size >= min_size:
            donor = np.where(~group & (quota > 0))[0]
            if donor.size:
                quota[donor[np.argmax(quota[donor])]] -= 1
                take = np.where(group)[0]
                quota[take[np.argmax(counts[take])]] += 1

    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(inverse == s), size=quota[s], replace=False)
        for s in range(len(strata))
        if quota[s]
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Any map-style data set as a NoisyDataset
# --------------------------------------------------------------------------------------------


def _mask(value: Any, n: int, name: str, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(value)).reshape(-1)
    if tensor.shape[0] != n:
        raise ValueError(f"{name} has {tensor.shape[0]} entries but the data set has {n}")
    if dtype == torch.bool and tensor.dtype != torch.bool:
        raise TypeError(f"{name} must be a boolean mask, got dtype {tensor.dtype}")
    return tensor.to(dtype)


def as_noisy_dataset(
    dataset: Any,
    *,
    is_noisy: Any = None,
    true_labels: Any = None,
    name: str = "dataset",
) -> NoisyDataset:
    """Any map-style data set of ``(x, y)`` or ``(x, y, id)`` items as a :class:`NoisyDataset`.

    Parameters
    ----------
    dataset : NoisyDataset or map-style dataset
        ``len(dataset)`` and ``dataset[i]`` giving ``(x, y)`` or ``(x, y, id)`` (tensors,
        arrays or numbers; e.g. ``torch.utils.data.TensorDataset``). A ``NoisyDataset`` is
        returned as it is (unless masks are given). Items are read once and stacked in memory.
    is_noisy : array of bool, optional
        Which labels are noisy (also read from a ``dataset.is_noisy`` attribute). Absent:
        all ``False`` (no example is known to be noisy).
    true_labels : array of int, optional
        The clean labels (also read from ``dataset.true_labels``). Absent: ``-1`` (unknown).
    name : str
        Used in error messages.

    Returns
    -------
    NoisyDataset
        ``example_ids`` from the items' ids, else the positions ``0..N-1``; ``num_classes``
        from the data set's ``num_classes`` attribute, else ``max(label) + 1`` (at least 2).

    Raises
    ------
    TypeError
        Not a map-style data set, or items that are not ``(x, y[, id])``.
    ValueError
        An empty data set, masks of the wrong length, inputs of different shapes.

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> ds = as_noisy_dataset(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 1])))
    >>> ds.example_ids.tolist(), ds.true_labels.tolist(), ds.is_noisy.tolist()
    ([0, 1, 2], [-1, -1, -1], [False, False, False])
    """
    if isinstance(dataset, NoisyDataset) and is_noisy is None and true_labels is None:
        return dataset
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"{name} must be a map-style data set (with len() and [i]) of "
                        f"(x, y) or (x, y, id) items, got {type(dataset).__name__}")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{name} is empty")
    if isinstance(dataset, NoisyDataset):
        inputs, labels, ids = dataset.inputs, dataset.labels, dataset.example_ids
    else:
        xs, ys, id_list = [], [], []
        for i in range(n):
            item = dataset[i]
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise TypeError(f"{name}[{i}] must be an (x, y) or (x, y, id) tuple, got "
                                f"{type(item).__name__}"
                                + (f" of length {len(item)}" if isinstance(item, (tuple, list))
                                   else ""))
            xs.append(torch.as_tensor(np.asarray(item[0]) if not isinstance(
                item[0], torch.Tensor) else item[0]).detach().cpu())
            ys.append(int(torch.as_tensor(item[1]).reshape(())))
            id_list.append(int(torch.as_tensor(item[2]).reshape(())) if len(item) == 3 else i)
        shapes = {tuple(x.shape) for x in xs}
        if len(shapes) != 1:
            raise ValueError(f"{name} has inputs of different shapes: {sorted(shapes)[:3]}")
        inputs = torch.stack(xs).float()
        labels, ids = torch.tensor(ys), torch.tensor(id_list)
        if len(set(id_list)) != n:
            raise ValueError(f"{name} has repeated example ids; ids must be unique")
    if is_noisy is None:
        is_noisy = getattr(dataset, "is_noisy", None)
    if true_labels is None:
        true_labels = getattr(dataset, "true_labels", None)
    noisy = (torch.zeros(n, dtype=torch.bool) if is_noisy is None
             else _mask(is_noisy, n, "is_noisy", torch.bool))
    true = (torch.full((n,), -1, dtype=torch.int64) if true_labels is None
            else _mask(true_labels, n, "true_labels", torch.int64))
    num_classes = getattr(dataset, "num_classes", None) or max(2, int(labels.max()) + 1)
    return NoisyDataset(inputs, labels, true, noisy, ids, num_classes=num_classes)
