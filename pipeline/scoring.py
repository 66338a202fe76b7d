"""Metrics shared by every stage."""
from __future__ import annotations

import numpy as np

EPS = 1e-15


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Multiclass log loss as Kaggle scores it (rows renormalised, probabilities clipped)."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    probs = probs / probs.sum(axis=1, keepdims=True)
    return float(-np.log(probs[np.arange(len(labels)), labels]).mean())


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float((np.asarray(probs).argmax(axis=1) == labels).mean())


def prior_probs(train_labels: np.ndarray, n: int) -> np.ndarray:
    """The class prior of `train_labels`, repeated for n rows."""
    prior = np.bincount(train_labels, minlength=3).astype(np.float64)
    prior /= prior.sum()
    return np.tile(prior, (n, 1))


def fold_prior(labels: np.ndarray, fold_of: np.ndarray) -> np.ndarray:
    """Per row, the class prior of the other folds: what a model trained without that row's fold would know."""
    prior = np.zeros((len(labels), 3))
    for k in np.unique(fold_of):
        prior[fold_of == k] = prior_probs(labels[fold_of != k], int((fold_of == k).sum()))
    return prior
