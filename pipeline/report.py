"""report.md with the metrics table and PNG plots (feature importance, reliability diagram)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import artifacts


def table(metrics: dict) -> str:
    """Markdown table: the stacker against the baselines, on the same folds."""
    rows = [("stacker", metrics["oof_logloss"], metrics["accuracy"])]
    rows += [(name, value, metrics["baseline_accuracy"][name]) for name, value in metrics["baselines"].items()]
    lines = ["| model | OOF log loss | accuracy |", "|---|---|---|"]
    lines += [f"| {name} | {loss:.4f} | {acc:.3f} |" for name, loss, acc in rows]
    lines.append(f"\nstacker gain over the best baseline: {metrics['gain_over_best_baseline']:+.4f} log loss "
                 f"(per fold: {', '.join(f'{v:.4f}' for v in metrics['per_fold'])})")
    return "\n".join(lines)


def reliability(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest over the three classes: mean predicted probability and observed frequency per bin."""
    predicted = probs.reshape(-1)
    observed = np.eye(3)[labels].reshape(-1)
    bins = np.minimum((predicted * n_bins).astype(int), n_bins - 1)
    keep = np.bincount(bins, minlength=n_bins) > 0
    mean_pred = np.bincount(bins, predicted, n_bins)[keep] / np.bincount(bins, minlength=n_bins)[keep]
    freq = np.bincount(bins, observed, n_bins)[keep] / np.bincount(bins, minlength=n_bins)[keep]
    return mean_pred, freq


def write(folder: Path, metrics: dict, importance: pd.Series, labels: np.ndarray,
          predictions: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = importance.head(25)[::-1]
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.barh(top.index, top.values)
    ax.set_xlabel("mean gain over folds")
    ax.set_title("Stacker feature importance (top 25)")
    fig.tight_layout()
    with artifacts.atomic_path(folder / "feature_importance.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    for name, probs in predictions.items():
        x, y = reliability(labels, probs)
        ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel("predicted probability (all classes, one-vs-rest)")
    ax.set_ylabel("observed frequency")
    ax.set_title("Reliability of OOF predictions")
    ax.legend()
    fig.tight_layout()
    with artifacts.atomic_path(folder / "reliability.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    text = ["# Stacker report", "", table(metrics), "",
            f"Best iterations per fold: {metrics['best_iterations']}; features: {metrics['n_features']}.", "",
            "![feature importance](feature_importance.png)", "", "![reliability](reliability.png)", ""]
    artifacts.write_text(folder / "report.md", "\n".join(text))
