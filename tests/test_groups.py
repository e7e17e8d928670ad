"""Grouped folds (classify.groups): near-copies (a burst of one shelf) stay on one side of every fold, every label
keeps photos in every fold, and the folds depend on the photos only, not on the order they were read in."""

from __future__ import annotations

import hashlib

import numpy as np

from fruitpipe.classify import groups


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _bursts(rng: np.random.Generator, labels: dict[str, list[int]], dim: int = 64) -> tuple[list[str], list[str],
                                                                                            np.ndarray, list[int]]:
    """Rows of labelled bursts: each burst a scene (a random direction) plus its label's direction, its photos the
    scene with a little noise (near-copies); returns ids, labels, features, burst index per row."""
    ids, names, feats, burst = [], [], [], []
    b = 0
    for label, sizes in labels.items():
        base = rng.normal(size=dim)
        for size in sizes:
            scene = base + 1.5 * rng.normal(size=dim)
            for _ in range(size):
                feats.append(scene + 0.05 * rng.normal(size=dim))
                names.append(label)
                burst.append(b)
                ids.append(hashlib.sha256(f"{label}-{b}-{len(ids)}".encode()).hexdigest())
            b += 1
    return ids, names, _unit(np.array(feats)), burst


def test_a_burst_stays_on_one_side_and_every_label_is_in_every_fold() -> None:
    rng = np.random.default_rng(0)
    ids, labels, z, burst = _bursts(rng, {"lime": [6, 5, 4, 3, 3, 2], "lemon": [6, 4, 4, 3, 2, 1],
                                          "apple": [3] * 9})
    got = groups.grouped_folds(ids, labels, z, 3)
    fold = np.array([got.fold_by_id[i] for i in ids])
    for b in set(burst):
        assert len({int(f) for f, bb in zip(fold, burst) if bb == b}) == 1, b  # near-copies on one side
    for label in set(labels):
        here = fold[np.array(labels) == label]
        assert set(here.tolist()) == {0, 1, 2}, label
        assert np.bincount(here).max() <= np.ceil(len(here) / 2)  # dealt, not piled up
    assert got.largest <= max(labels.count(lb) for lb in set(labels)) // 3  # no group above a third of its label
    # folds by content id alone put most bursts on several sides: what the grouping is for
    plain = groups.fold_of(ids, 3)
    assert sum(len({int(plain[i]) for i in range(len(ids)) if burst[i] == b}) > 1 for b in set(burst)) >= 10


def test_the_folds_do_not_depend_on_the_reading_order() -> None:
    rng = np.random.default_rng(1)
    ids, labels, z, _ = _bursts(rng, {"kiwi": [5, 4, 3, 2, 2], "pear": [4, 4, 4, 1]})
    first = groups.grouped_folds(ids, labels, z, 3)
    perm = rng.permutation(len(ids))
    again = groups.grouped_folds([ids[i] for i in perm], [labels[i] for i in perm], z[perm], 3)
    assert first == again and first.key() == again.key()
    assert groups.grouped_folds(ids, labels, z, 4).folds == 4


def test_no_group_outgrows_its_share_even_when_everything_looks_alike() -> None:
    """One shelf photographed 30 times: linking stops before a group holds more than a third of the label."""
    rng = np.random.default_rng(2)
    z = _unit(np.ones((30, 16)) + 0.01 * rng.normal(size=(30, 16)))
    g = groups.near_copy_groups(z, 1 / 3)
    assert np.bincount(g).max() <= 10 and len(g) == 30
    assert groups.near_copy_groups(z[:1], 1 / 3).tolist() == [0]
