"""The demo's pieces in-process: the shipped data, label flipping, ROC AUC and precision at k."""
import itertools

import numpy as np
import pytest

from twicediff.app import demo


def brute_force_auc(scores, positives):
    pos, neg = scores[positives], scores[~positives]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_load_digits_is_the_uci_set():
    images, labels = demo.load_digits()
    assert images.shape == (demo.NUM_IMAGES, 64) and labels.shape == (demo.NUM_IMAGES,)
    assert images.min() == 0.0 and images.max() == 1.0
    assert np.all(images * 16 == np.round(images * 16))
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 1797 and counts.min() >= 170 and counts.max() <= 190


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    scores = rng.integers(0, 6, size=n).astype(float)  # many ties
    positives = rng.random(n) < 0.3
    positives[0], positives[1] = True, False
    assert demo.roc_auc(scores, positives) == pytest.approx(brute_force_auc(scores, positives), abs=1e-12)


def test_roc_auc_extremes_and_bad_input():
    positives = np.array([True, True, False, False, False])
    assert demo.roc_auc(np.array([5.0, 4, 3, 2, 1]), positives) == 1.0
    assert demo.roc_auc(np.array([1.0, 2, 3, 4, 5]), positives) == 0.0
    assert demo.roc_auc(np.zeros(5), positives) == 0.5
    with pytest.raises(ValueError, match="at least one positive"):
        demo.roc_auc(np.zeros(3), np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="same shape"):
        demo.roc_auc(np.zeros(3), np.zeros(4, dtype=bool))


def test_precision_at_k():
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2])
    positives = np.array([True, False, False, True, True])
    assert demo.precision_at_k(scores, positives, 1) == 1.0
    assert demo.precision_at_k(scores, positives, 2) == 0.5
    assert demo.precision_at_k(scores, positives, 3) == pytest.approx(2 / 3)
    assert demo.precision_at_k(scores, positives, 5) == 0.6
    for k in (0, 6):
        with pytest.raises(ValueError, match=f"k must be between 1 and 5.*got {k}"):
            demo.precision_at_k(scores, positives, k)


def test_flip_labels_changes_exactly_the_chosen_fraction():
    labels = np.random.default_rng(0).integers(0, 10, size=1200)
    noisy, flipped = demo.flip_labels(labels, 0.1, np.random.default_rng(1))
    assert flipped.sum() == 120
    assert np.all(noisy[flipped] != labels[flipped]) and np.all(noisy[~flipped] == labels[~flipped])
    assert noisy.min() >= 0 and noisy.max() <= 9
    again, flipped_again = demo.flip_labels(labels, 0.1, np.random.default_rng(1))
    assert np.array_equal(again, noisy) and np.array_equal(flipped_again, flipped)


@pytest.mark.parametrize("field, value, fragment", [
    ("n_train", 0, "n_train must be a positive int"),
    ("n_val", 1000, r"n_train \+ n_val must be at most 1797"),
    ("flip_fraction", 0.0001, "flip at least one"),
    ("regularization", 0.0, "regularization"),
    ("kfac_damping", 0.0, "kfac_damping must be > 0, got 0.0"),
    ("weight_decay", -1.0, "weight_decay must be >= 0"),
])
def test_config_validation_names_the_field(field, value, fragment):
    config = demo.DemoConfig(**{field: value})
    with pytest.raises(ValueError, match=fragment):
        config.validate(demo.NUM_IMAGES)
