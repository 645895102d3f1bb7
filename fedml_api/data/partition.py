"""Assign a dataset's samples to federated clients: IID shares or Dirichlet label skew.

Every function takes a ``numpy.random.Generator`` and is deterministic given its state,
so the same seed always produces the same clients.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

#: Ways of sharing a train set among clients (``--partition``).
PARTITIONS = ("iid", "dirichlet")


def partition_iid(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator
) -> List[np.ndarray]:
    """Shuffle the sample indices and cut them into ``num_clients`` near-equal shares.

    Args:
        labels: 1-D array of the ``N`` labels (only its length is used; the argument keeps
            the signature the same as :func:`partition_dirichlet`).
        num_clients: Number of shares, ``1 <= num_clients <= N``.
        rng: Source of randomness.

    Returns:
        ``num_clients`` sorted int64 index arrays that together hold every index
        ``0 .. N-1`` exactly once; their sizes differ by at most one.
    """
    num_samples = _num_labels(labels)
    _check_num_clients(num_clients, num_samples)
    shares = np.array_split(rng.permutation(num_samples), num_clients)
    return [np.sort(share).astype(np.int64) for share in shares]


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_samples_per_client: int = 10,
    max_attempts: int = 1000,
) -> List[np.ndarray]:
    """Label-skewed shares: each class is spread over the clients in Dirichlet proportions.

    For every class, proportions ``p ~ Dirichlet(alpha, ..., alpha)`` over the clients are
    drawn and the class's samples are dealt out accordingly (Hsu et al., 2019). Small
    ``alpha`` (e.g. 0.1) gives each client a few dominant classes; large ``alpha`` (e.g.
    100) approaches an IID split. Whole draws are repeated until every client holds at
    least ``min_samples_per_client`` samples, since an empty client cannot train.

    Args:
        labels: 1-D integer array of the ``N`` labels.
        num_clients: Number of shares, ``1 <= num_clients <= N``.
        alpha: Dirichlet concentration, ``> 0``.
        rng: Source of randomness.
        min_samples_per_client: Smallest acceptable share; ``num_clients`` times it must
            not exceed ``N``.
        max_attempts: Draws to try before giving up.

    Returns:
        ``num_clients`` sorted int64 index arrays that together hold every index exactly once.

    Raises:
        ValueError: an argument is out of range or the minimum cannot be met by any draw.
        RuntimeError: no draw met the minimum within ``max_attempts``.
    """
    num_samples = _num_labels(labels)
    _check_num_clients(num_clients, num_samples)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_samples_per_client < 0:
        raise ValueError(f"min_samples_per_client must be >= 0, got {min_samples_per_client}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    if num_clients * min_samples_per_client > num_samples:
        raise ValueError(
            f"cannot give each of {num_clients} clients at least {min_samples_per_client} samples: "
            f"that needs {num_clients * min_samples_per_client}, the dataset has {num_samples}"
        )
    labels = np.asarray(labels)
    # Shuffled once so that each client's slice of a class is a random subset, not a run of
    # neighbouring files; the Dirichlet draws below supply the per-attempt randomness.
    class_indices = [
        rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)
    ]
    concentration = np.full(num_clients, float(alpha))
    for _ in range(max_attempts):
        shares: List[List[np.ndarray]] = [[] for _ in range(num_clients)]
        for indices in class_indices:
            proportions = rng.dirichlet(concentration)
            cuts = (np.cumsum(proportions)[:-1] * len(indices)).astype(np.int64)
            for share, part in zip(shares, np.split(indices, cuts)):
                share.append(part)
        if min(sum(len(part) for part in share) for share in shares) >= min_samples_per_client:
            return [np.sort(np.concatenate(share)).astype(np.int64) for share in shares]
    raise RuntimeError(
        f"no Dirichlet(alpha={alpha}) draw in {max_attempts} attempts gave all {num_clients} "
        f"clients at least {min_samples_per_client} samples; raise alpha, use fewer clients "
        "or lower the minimum"
    )


def _num_labels(labels: np.ndarray) -> int:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {list(labels.shape)}")
    return len(labels)


def _check_num_clients(num_clients: int, num_samples: int) -> None:
    if not 1 <= num_clients <= num_samples:
        raise ValueError(
            f"num_clients must be between 1 and the number of samples ({num_samples}), "
            f"got {num_clients}"
        )


def partition_train_and_test(
    train_labels: np.ndarray,
    num_test: int,
    num_clients: int,
    partition: str,
    alpha: float,
    seed: int,
    min_samples_per_client: int = 1,
) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Every client's train and test sample indices.

    The train set is shared by ``partition`` (``"iid"``, or ``"dirichlet"`` label skew
    with concentration ``alpha``) of ``train_labels``; the ``num_test`` test samples are
    shared IID. Both draws come from independent generators spawned from ``seed``.
    """
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    if partition == "iid":
        train_shares = partition_iid(train_labels, num_clients, train_rng)
    elif partition == "dirichlet":
        train_shares = partition_dirichlet(train_labels, num_clients, alpha, train_rng, min_samples_per_client=min_samples_per_client)
    else:
        raise ValueError(f"unknown partition {partition!r}; expected one of {', '.join(PARTITIONS)}")
    return train_shares, partition_iid(np.zeros(num_test, dtype=np.int64), num_clients, test_rng)
