"""The robustness report's plots and Markdown, from the figures :func:`jaxcifar.robustness.evaluate_robustness`
returns: ensemble vs single seeds, pairwise disagreement, per-class accuracy, a reliability diagram and a
corruption heat map. :func:`write_robustness_report` writes the PNGs and returns the Markdown paragraphs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcifar.report import markdown_table, pyplot, save_figure

PLOTS = {"ensemble": "ensemble.png", "disagreement": "disagreement.png", "per_class": "per_class_accuracy.png",
         "calibration": "reliability.png", "corruptions": "corruptions.png"}


def _nan(values: Any) -> np.ndarray:
    """JSON lists (None for NaN) back to a float array (numpy reads None as NaN for a float dtype)."""
    return np.array(values, np.float64)


def plot_ensemble(accuracy: Sequence[float], ensemble: float, labels: Sequence[str], path: Path) -> None:
    """One bar per model, the ensemble's bar beside them, the mean single-model accuracy as a dashed line."""
    plt = pyplot()
    values = [*accuracy, ensemble]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(values) + 2), 4))
    bars = ax.bar(range(len(values)), values, tick_label=[*labels, "ensemble"],
                  color=["tab:blue"] * len(accuracy) + ["tab:orange"])
    ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.axhline(float(np.mean(accuracy)), ls="--", color="gray", label=f"mean of seeds {np.mean(accuracy):.4f}")
    low, high = min(values), max(values)
    ax.set_ylim(max(0.0, low - 0.3 * (high - low + 0.01)), min(1.0, high + 0.3 * (high - low + 0.01)))
    ax.set(ylabel="test accuracy", title="single seeds vs their ensemble (mean softmax)")
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def _annotated_image(ax, matrix: np.ndarray, fmt: str) -> Any:
    image = ax.imshow(matrix, cmap="viridis")
    middle = np.nanmin(matrix) + 0.5 * (np.nanmax(matrix) - np.nanmin(matrix))
    if matrix.size <= 120:
        for (i, j), v in np.ndenumerate(matrix):
            if np.isnan(v):
                continue
            colour = "black" if v > middle else "white"  # readable on viridis' bright and dark ends
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7, color=colour)
    return image


def plot_disagreement(matrix: np.ndarray, labels: Sequence[str], path: Path) -> None:
    """The [K, K] fraction of test images on which two seeds predict different classes."""
    plt = pyplot()
    k = len(labels)
    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * k, 2 + 0.5 * k))
    off_diagonal = np.where(np.eye(k, dtype=bool), np.nan, matrix)  # the zero diagonal would flatten the colours
    fig.colorbar(_annotated_image(ax, off_diagonal, "{:.3f}"), ax=ax, label="fraction of test images")
    ax.set_xticks(range(k), labels, rotation=45)
    ax.set_yticks(range(k), labels)
    ax.set_title("pairwise prediction disagreement")
    save_figure(fig, path)


def plot_per_class(per_class: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """Mean accuracy per class over the seeds ([K, C]) with +-std error bars (std needs 2 seeds)."""
    plt = pyplot()
    mean = np.nanmean(per_class, 0)
    std = np.nanstd(per_class, 0, ddof=1) if len(per_class) > 1 else np.zeros_like(mean)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.12 * len(mean) + 4), 4))
    ax.bar(range(len(mean)), mean, yerr=std, capsize=2)
    if len(mean) <= 20:
        ax.set_xticks(range(len(mean)), list(class_names), rotation=45)
    ax.set(ylabel="test accuracy", xlabel="class", ylim=(0, 1),
           title=f"per-class accuracy, mean +- std over {len(per_class)} seeds")
    save_figure(fig, path)


def plot_reliability(clean: dict[str, Any], path: Path) -> None:
    """Reliability diagram: accuracy against confidence per bin for every seed (points) and the ensemble
    (bars), with the diagonal of perfect calibration and each one's ECE."""
    plt = pyplot()
    bins = len(clean["bin_count"][0])
    edges = np.linspace(0, 1, bins + 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    ens = clean["ensemble"]
    ax.bar(edges[:-1], _nan(ens["bin_accuracy"]), width=1 / bins, align="edge", alpha=0.5, edgecolor="k",
           color="tab:orange", label=f"ensemble (ECE {ens['ece']:.3f})")
    for k, (conf, acc) in enumerate(zip(clean["bin_confidence"], clean["bin_accuracy"], strict=True)):
        label = f"seeds (mean ECE {np.mean(clean['ece']):.3f})" if k == 0 else None
        ax.plot(_nan(conf), _nan(acc), "o", ms=3, alpha=0.6, color="tab:blue", label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlabel="confidence (top probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"reliability diagram ({bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, path)


def corruption_grid(corruptions: dict[str, Any]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """``(names, severities, mean, std)``: accuracy per corruption x severity, mean and std over the seeds."""
    names = list(corruptions["cells"])
    severities = [str(s) for s in corruptions["severities"]]
    cells = np.array([[corruptions["cells"][n][s]["accuracy"] for s in severities] for n in names])
    std = cells.std(-1, ddof=1) if cells.shape[-1] > 1 else np.zeros(cells.shape[:2])
    return names, severities, cells.mean(-1), std


def plot_corruptions(corruptions: dict[str, Any], clean_accuracy: float, path: Path) -> None:
    """Heat map of the mean accuracy over seeds per corruption (rows) and severity (columns)."""
    plt = pyplot()
    names, severities, mean, _ = corruption_grid(corruptions)
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(severities), 1.5 + 0.4 * len(names)))
    image = _annotated_image(ax, mean, "{:.2f}")
    fig.colorbar(image, ax=ax, label="test accuracy (mean over seeds)")
    ax.set_xticks(range(len(severities)), severities)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="severity", title=f"accuracy under corruption (clean {clean_accuracy:.3f})")
    save_figure(fig, path)


def _clean_paragraphs(clean: dict[str, Any], labels: Sequence[str], class_names: Sequence[str],
                      plots: dict[str, str]) -> list[str]:
    s = clean["summary"]
    rows = [[label, a, e, n, b] for label, a, e, n, b in
            zip(labels, clean["accuracy"], clean["ece"], clean["nll"], clean["brier"], strict=True)]
    ens = clean["ensemble"]
    rows.append(["ensemble", ens["accuracy"], ens["ece"], ens["nll"], ens["brier"]])
    per_class = _nan(clean["per_class_accuracy"])
    spread = np.nanstd(per_class, 0, ddof=1) if len(per_class) > 1 else np.zeros(per_class.shape[1])
    mean = np.nanmean(per_class, 0)
    worst = [f"{class_names[c]} {mean[c]:.3f}" for c in np.argsort(mean)[:3]]
    unstable = [f"{class_names[c]} (std {spread[c]:.3f})" for c in np.argsort(-spread)[:3]]
    return [
        "## Ensemble, disagreement, calibration",
        f"**Ensemble of the {len(labels)} seeds (mean softmax): {s['ensemble_accuracy']:.4f} test accuracy, against "
        f"{s['mean_single_accuracy']:.4f} for a single seed on average ({s['ensemble_gain']:+.4f}).** Two seeds "
        f"disagree on {s['mean_disagreement']:.1%} of the test images on average.",
        markdown_table(["model", "test acc", "ECE", "NLL", "Brier"], rows),
        f"Weakest classes (mean accuracy): {', '.join(worst)}. Least stable over seeds: {', '.join(unstable)}.",
        f"![ensemble]({plots['ensemble']}) ![disagreement]({plots['disagreement']})",
        f"![per-class accuracy]({plots['per_class']}) ![reliability diagram]({plots['calibration']})",
    ]


def _corruption_paragraphs(corruptions: dict[str, Any], clean_accuracy: float, plots: dict[str, str]) -> list[str]:
    names, severities, mean, std = corruption_grid(corruptions)
    st = corruptions["statistics"]
    rows = [[n, *[f"{m:.3f} +- {d:.3f}" for m, d in zip(mean[i], std[i], strict=True)]] for i, n in enumerate(names)]
    return [
        "## Common corruptions",
        f"**Mean accuracy over {len(names)} corruptions x {len(severities)} severities: {st['mean']:.4f} +- "
        f"{st['std']:.4f} (mean +- std over seeds), against {clean_accuracy:.4f} clean,** on "
        f"{corruptions.get('images') or 'all'} test images per cell, {corruptions.get('source', '')}.",
        markdown_table(["corruption", *[f"severity {s}" for s in severities]], rows),
        f"![corruption heat map]({plots['corruptions']})",
    ]


def write_robustness_report(out: Path, figures: dict[str, Any], labels: Sequence[str],
                            class_names: Sequence[str]) -> list[str]:
    """Write the plots of ``figures`` (from ``evaluate_robustness``) into ``out`` and return the report's
    Markdown paragraphs; ``labels`` name the models (e.g. ``"seed 0"``). A sweep's variants get a section each
    (their plots prefixed ``variant<i>_``), and the report says the runs were grouped so."""
    if "variants" not in figures:
        return _variant_report(Path(out), figures, labels, class_names, PLOTS)
    paragraphs = [f"The runs differ in more than their seed, so each of the {len(figures['variants'])} variants is "
                  "evaluated apart: ensembles and mean +- std over the seeds of one variant, never across variants."]
    for i, part in enumerate(figures["variants"]):
        named = ", ".join(f"{k} {v}" for k, v in part["variant"].items())
        plots = {k: f"variant{i}_{v}" for k, v in PLOTS.items()}
        section = _variant_report(Path(out), part, [labels[r] for r in part["runs"]], class_names, plots)
        paragraphs += [f"# Variant {i}: {named} ({len(part['runs'])} runs)",
                       *(p.replace("## ", "### ", 1) if p.startswith("## ") else p for p in section)]
    return paragraphs


def _variant_report(out: Path, figures: dict[str, Any], labels: Sequence[str], class_names: Sequence[str],
                    plots: dict[str, str]) -> list[str]:
    """The plots (file names ``plots``) and paragraphs of one variant's figures."""
    clean = figures["clean"]
    plot_ensemble(clean["accuracy"], clean["ensemble"]["accuracy"], labels, out / plots["ensemble"])
    plot_disagreement(_nan(clean["disagreement"]), labels, out / plots["disagreement"])
    plot_per_class(_nan(clean["per_class_accuracy"]), class_names, out / plots["per_class"])
    plot_reliability(clean, out / plots["calibration"])
    paragraphs = _clean_paragraphs(clean, labels, class_names, plots)
    if "corruptions" in figures:
        accuracy = clean["summary"]["mean_single_accuracy"]
        plot_corruptions(figures["corruptions"], accuracy, out / plots["corruptions"])
        paragraphs += _corruption_paragraphs(figures["corruptions"], accuracy, plots)
    return paragraphs
