"""Linear probes on the residual stream (scikit-learn logistic regression).

Training is deterministic: the features are the model's residuals in a fixed order, and
the solver (L-BFGS) has no random state; the same texts give bit-identical weights.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from depass_eval.data import read_json
from depass_eval.model import EvalModel


@dataclass
class Probe:
    """A fitted linear probe at one layer: ``scores = x @ weight.T + bias``."""

    layer: int
    weight: np.ndarray  # (C, D); one row for a binary probe
    bias: np.ndarray  # (C,)
    train_accuracy: float
    test_accuracy: float
    train_size: int
    test_size: int

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(B, C) decision values of residuals ``x`` (B, D)."""
        return np.asarray(x, dtype=np.float64) @ self.weight.T + self.bias

    def predict(self, x: np.ndarray, classes: int) -> np.ndarray:
        s = self.scores(x)
        return (s[:, 0] > 0).astype(int) if classes == 2 else s.argmax(-1)

    @staticmethod
    def describe(summary: dict[str, Any], name: str) -> str:
        """One Markdown sentence on a probe's :meth:`summary`: its layer and accuracies."""
        return (
            f"{name} probe at layer {summary['layer']}:"
            f" train accuracy {summary['train_accuracy']:.3f} ({summary['train_size']} texts),"
            f" **test accuracy {summary['test_accuracy']:.3f}** ({summary['test_size']} texts)."
        )

    def summary(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
            "train_size": self.train_size,
            "test_size": self.test_size,
        }


def texts_and_labels(name: str, size: int | None, seed: int) -> tuple[list[str], np.ndarray]:
    """A probe data file's texts and labels, all or a seeded sample of ``size``."""
    records = read_json(name)
    if size is not None and size < len(records):
        records = random.Random(seed).sample(records, size)
    return [r["text"] for r in records], np.array([int(r["label"]) for r in records])


def fit_probe(
    model: EvalModel,
    layer: int,
    train: tuple[list[str], np.ndarray],
    test: tuple[list[str], np.ndarray],
) -> Probe:
    """Fit a logistic regression on the residual entering ``layer`` at the last token."""
    x_train = model.residual([model.encode(t) for t in train[0]], layer).double().numpy()
    x_test = model.residual([model.encode(t) for t in test[0]], layer).double().numpy()
    return _fit(layer, x_train, train[1], x_test, test[1])


def fit_probes(
    model: EvalModel,
    layers: list[int],
    train: tuple[list[str], np.ndarray],
    test: tuple[list[str], np.ndarray],
) -> list[Probe]:
    """One probe per layer of ``layers``, the residuals of all layers from one forward."""
    x_train = model.residuals_at([model.encode(t) for t in train[0]], layers).double().numpy()
    x_test = model.residuals_at([model.encode(t) for t in test[0]], layers).double().numpy()
    return [_fit(layer, x_train[k], train[1], x_test[k], test[1]) for k, layer in enumerate(layers)]


def _fit(
    layer: int, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> Probe:
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(C=1.0, max_iter=2000)
    classifier.fit(x_train, y_train)
    return Probe(
        layer=layer,
        weight=classifier.coef_.astype(np.float64),
        bias=classifier.intercept_.astype(np.float64),
        train_accuracy=float(classifier.score(x_train, y_train)),
        test_accuracy=float(classifier.score(x_test, y_test)),
        train_size=len(x_train),
        test_size=len(x_test),
    )


def cached_probe(path: Path, fit: Callable[[], Probe]) -> Probe:
    """The probe saved at ``path`` (``.npz``), or ``fit()`` saved there: a resumed run and
    ``--report-only`` read the probe the run trained."""
    if path.exists():
        saved = np.load(path)
        train_acc, test_acc, train_size, test_size = saved["stats"].tolist()
        return Probe(
            int(saved["layer"]),
            saved["weight"],
            saved["bias"],
            train_acc,
            test_acc,
            int(train_size),
            int(test_size),
        )
    probe = fit()
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = [probe.train_accuracy, probe.test_accuracy, probe.train_size, probe.test_size]
    np.savez(path, layer=probe.layer, weight=probe.weight, bias=probe.bias, stats=np.array(stats))
    return probe
