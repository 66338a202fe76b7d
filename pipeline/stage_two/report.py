"""report.md with the metrics tables and PNG plots (log loss per model, reliability diagram)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import artifacts, layout


def table(metrics: dict) -> str:
    """Markdown table: the stacker against the baselines and its members, on the same folds."""
    lines = ["| model | OOF log loss | accuracy |", "|---|---|---|",
             f"| stacker | {metrics['oof_logloss']:.4f} | {metrics['accuracy']:.3f} |"]
    lines += [f"| {name} | {value:.4f} | {metrics['baseline_accuracy'][name]:.3f} |"
              for name, value in metrics["baselines"].items()]
    lines += [f"| member: {name} | {value:.4f} | |" for name, value in metrics["members"].items()]
    lines.append(f"\nstacker gain over the best baseline (prior, length, head): "
                 f"{metrics['gain_over_best_baseline']:+.4f} log loss; chosen per fold: {', '.join(metrics['chosen'])}")
    return "\n".join(lines)


def fold_table(metrics: dict) -> str:
    n_folds = len(metrics["per_fold"])
    lines = ["| fold | stacker | " + " | ".join(metrics["baseline_per_fold"]) + " | chosen | why | blend weights |",
             "|---" * (5 + len(metrics["baseline_per_fold"])) + "|"]
    for k in range(n_folds):
        lines.append(f"| {k} | {metrics['per_fold'][k]:.4f} | " +
                     " | ".join(f"{v[k]:.4f}" for v in metrics["baseline_per_fold"].values()) +
                     f" | {metrics['chosen'][k]} | {metrics['chosen_reason'][k]} | {blend_summary(metrics['blend'][k])} |")
    return "\n".join(lines)


def blend_summary(blend: dict) -> str:
    """A fold's pool in words: its kind, each member's weight (and temperature), the prior's share or the tie bias."""
    temperatures = blend.get("temperatures", {})
    weights = ", ".join(f"{n} {w:.2f}" + (f" (T {temperatures[n]:.2f})" if temperatures.get(n, 1.0) != 1.0 else "")
                        for n, w in blend["weights"].items())
    if blend.get("kind") in ("linear", "geometric"):
        return f"{blend['kind']}: {weights}, prior {blend['prior_weight']:.2f}"
    return f"log-linear: {weights}; tie bias {blend['tie_bias']:.2f}"


def inner_table(metrics: dict) -> str:
    """Each candidate's log loss on each fold's inner split (what the selection compared)."""
    names = list(metrics["inner_losses"][0]) if metrics["inner_losses"] else []
    lines = ["| fold | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    lines += [f"| {k} | " + " | ".join(f"{losses[n]:.4f}" for n in names) + " |"
              for k, losses in enumerate(metrics["inner_losses"])]
    return "\n".join(lines)


def params_table(metrics: dict) -> str:
    """The hyper-parameters chosen on each fold's inner split: one row per fold, one column per member."""
    names = list(metrics["params"][0]) if metrics["params"] else []
    lines = ["| fold | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    for k, chosen in enumerate(metrics["params"]):
        cells = [", ".join(f"{key}={value}" for key, value in chosen[name].items()) or "—" for name in names]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reliability(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest over the three classes, equal-count bins (every point stands for as many predictions): mean
    predicted probability and observed frequency per bin."""
    from sklearn.calibration import calibration_curve

    observed, predicted = calibration_curve(np.eye(3)[labels].reshape(-1), np.asarray(probs).reshape(-1),
                                            n_bins=n_bins, strategy="quantile")
    return predicted, observed


def write(folder: Path, metrics: dict, labels: np.ndarray, predictions: dict[str, np.ndarray],
          fold_of: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = {"stacker": metrics["oof_logloss"], **metrics["baselines"],
              **{f"member {k}": v for k, v in metrics["members"].items()}}
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.barh(list(losses)[::-1], list(losses.values())[::-1])
    ax.bar_label(bars, labels=[f"{v:.4f}" for v in list(losses.values())[::-1]], padding=3, fontsize=8)
    ax.axvline(metrics["baselines"]["prior"], color="grey", linestyle="--", linewidth=1, label="class prior")
    ax.set_xlim(0, max(losses.values()) * 1.15)
    ax.set_xlabel("OOF log loss (lower is better)")
    ax.set_title("Stacker, baselines and members on the same folds")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with artifacts.atomic_path(folder / "logloss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    for name, probs in predictions.items():
        x, y = reliability(labels, probs)
        ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel("predicted probability (all classes, one-vs-rest; 10 equal-count bins)")
    ax.set_ylabel("observed frequency")
    ax.set_title("Reliability of OOF predictions")
    ax.legend()
    fig.tight_layout()
    with artifacts.atomic_path(folder / "reliability.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

    features = metrics["features"]
    vectors = features["vectors"]
    members = ", ".join(f"{m} = {features['estimators'][m]} on {features['groups'][m]}"
                        for m in features["blend_members"])
    text = ["# Stacker report", "", table(metrics), "", "## Per fold", "", fold_table(metrics), "",
            "## What the stacker read", "",
            f"- members (blended; one alone replaces the blend only where the inner split says so): {members}",
            f"- vectors: {vectors['prefix'] or 'fine-tuned '}layers {vectors['layers']}, blocks {vectors['kinds']}, "
            f"orientations {vectors['orientations']}, PCA {features['pca_components']} per block",
            f"- folds grouped by {features['cv_group_by']}; fold sizes {np.bincount(fold_of).tolist()}",
            "", "## Hyper-parameters chosen on each fold's inner split", "", params_table(metrics), "",
            "## Inner-split log loss per candidate", "", inner_table(metrics), "",
            "![log loss](logloss.png)", "", "![reliability](reliability.png)", ""]
    artifacts.write_text(folder / layout.REPORT, "\n".join(text))
