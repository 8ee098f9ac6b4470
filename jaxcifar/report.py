"""Results on disk: JSON (every figure, config and versions), Markdown tables and PNG plots, written
atomically (temporary file + rename) so a kill never leaves half a file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxcifar.compare import t_interval
from jaxcifar.data.cache import atomic_write_bytes


def write_json(path: Path, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, indent=2, default=_default).encode()
    atomic_write_bytes(Path(path), lambda f: f.write(data))


def divergence_note(labels: Sequence[str], summaries: Sequence[dict[str, Any]]) -> str:
    """A report paragraph naming the runs that diverged (their loss became NaN/inf; training froze them there)
    with the epoch, or ``""`` when none did."""
    diverged = [f"{label} (epoch {s['diverged_at_epoch']})" for label, s in zip(labels, summaries, strict=True)
                if s.get("diverged_at_epoch")]
    if not diverged:
        return ""
    return ("**Diverged** (loss NaN/inf; the run was frozen there while the others trained on, and its test figures "
            "are those of its best epoch before): " + ", ".join(diverged) + ".")


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(Path(path), lambda f: f.write(text.encode()))


def _default(x):
    if isinstance(x, np.generic | np.ndarray):
        return x.tolist()
    return str(x)


def seed_statistics(values: Sequence[float]) -> dict[str, float]:
    """``mean``, ``std`` (ddof=1), ``min``, ``max``, ``n`` and the 95 % t interval of the mean with the exact t
    quantile for every n (``ci95_low``/``ci95_high``/``ci95_half_width``; NaN for n = 1)."""
    x = np.asarray(values, np.float64)
    low, high = t_interval(x)
    return {"n": len(x), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else float("nan"),
            "min": float(x.min()), "max": float(x.max()), "ci95_half_width": (high - low) / 2,
            "ci95_low": low, "ci95_high": high}


def _interval(low: float, high: float, digits: int = 4) -> str:
    return "-" if np.isnan(low) else f"[{low:.{digits}f}, {high:.{digits}f}]"


def comparison_tables(comparison: dict[str, Any], name: str) -> str:
    """Markdown: each variant's mean, std and intervals over seeds; then each variant's paired difference from
    the reference one (default the best) with its interval, Holm-adjusted p-value, probability of improvement and
    the seeds needed."""
    level = f"{comparison['confidence']:.0%}"
    rows = [[str(v), s["n"], s["mean"], s["std"], _interval(s["ci_low"], s["ci_high"]),
             _interval(s["boot_low"], s["boot_high"])] for v, s in comparison["variants"].items()]
    table = markdown_table([name, "seeds", "mean", "std", f"{level} t interval", f"{level} bootstrap"], rows)
    best = comparison["reference"]
    rows = [[f"{best} - {v}", d["test"], d["mean"],
             _interval(d["ci_low"], d["ci_high"]), d["p_holm"], d["prob_improvement"], d["seeds_needed"]]
            for v, d in comparison["differences"].items()]
    diffs = markdown_table(["difference", "test", "mean", f"{level} interval", "p (Holm)", f"P({best} > other)",
                            "seeds to tell apart"], rows)
    return table + ("\n\n" + diffs if rows else "")


def wilson_table(comparison: dict[str, Any], name: str) -> str:
    """Each run's figure with the test set's own interval (Wilson; ``compare_scores(..., n_test=...)``): with
    one seed per variant, the only uncertainty that can be measured."""
    rows = [[str(v), seed, acc, _interval(low, high)]
            for v, per_seed in comparison["wilson"].items() for seed, (acc, low, high) in per_seed.items()]
    level = f"{comparison['confidence']:.0%}"
    return markdown_table([name, "seed", "test acc", f"{level} Wilson interval (test set)"], rows)


def plot_forest(comparison: dict[str, Any], path: Path, metric: str, title: str = "") -> None:
    """A forest plot: each variant's mean with its t interval (left) and each variant's difference from the
    reference (default the best) with its interval, a dashed line at zero (right)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(comparison["variants"]) + 2), squeeze=False)
    panels = ((comparison["variants"], metric, f"mean and {comparison['confidence']:.0%} interval over seeds"),
              (comparison["differences"], f"{comparison['reference']} minus variant",
               f"paired difference from {comparison['reference']}"))
    for ax, (items, xlabel, heading) in zip(axes[0], panels, strict=True):
        means = np.asarray([x["mean"] for x in items.values()])
        spans = np.asarray([[x["mean"] - x["ci_low"], x["ci_high"] - x["mean"]] for x in items.values()]).T
        ax.errorbar(means, range(len(means)), xerr=np.nan_to_num(spans.reshape(2, -1)), fmt="o", capsize=4)
        ax.set_yticks(range(len(means)), [str(v) for v in items])  # one seed: no interval, the point alone
        ax.set(xlabel=xlabel, title=heading)
        ax.grid(alpha=0.3)
    axes[0, 1].axvline(0.0, ls="--", color="gray")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def epoch_table(h: dict[str, Any]) -> str:
    """A history's per-epoch figures as a Markdown table: training and validation loss and accuracy."""
    rows = [[e, h["train_loss"][i], h["train_accuracy"][i], h["val_loss"][i], h["val_accuracy"][i]]
            for i, e in enumerate(h["epoch"])]
    return markdown_table(["epoch", "train loss", "train acc", "val loss", "val acc"], rows)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write_bytes(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))
    pyplot().close(fig)


def _integer_epochs(ax, epochs: Sequence[int]) -> None:
    """Whole-number ticks on an epoch axis: each epoch when there are few (one epoch would otherwise get
    fractional ticks around it), else at most about ten."""
    from matplotlib.ticker import MaxNLocator

    if len(epochs) <= 10:
        ax.set_xticks(list(epochs))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def selection_split(histories: Sequence[dict]) -> str:
    """``"validation"``, or ``"training"`` when a run had no validation split (its best epoch and the curves
    plotted for "validation" are then training figures)."""
    return "validation" if all(_has(h, "val_accuracy") for h in histories) else "training"


def plural(n: int, word: str) -> str:
    """``"1 seed"``, ``"3 seeds"``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def plot_curves(histories: Sequence[dict], labels: Sequence[str], path: Path, title: str = "") -> None:
    """One row per run: train vs validation loss (left) and accuracy (right) per epoch, with the
    per-interval training loss as a thin line."""
    plt = pyplot()
    fig, axes = plt.subplots(len(histories), 2, figsize=(10, 3.2 * len(histories)), squeeze=False)
    for (ax_l, ax_a), h, label in zip(axes, histories, labels, strict=True):
        steps_per_epoch = (h["interval"]["step"][-1] / h["epoch"][-1]) if h["interval"]["step"] else 1
        if h["interval"]["step"]:
            at = np.asarray(h["interval"]["step"]) / steps_per_epoch
            ax_l.plot(at, h["interval"]["loss"], lw=0.7, alpha=0.5, label="train (every log interval)")
            ax_a.plot(at, h["interval"]["accuracy"], lw=0.7, alpha=0.5, label="train (every log interval)")
        ax_l.plot(h["epoch"], h["train_loss"], "o-", label="train")
        ax_a.plot(h["epoch"], h["train_accuracy"], "o-", label="train")
        if _has(h, "val_loss"):
            ax_l.plot(h["epoch"], h["val_loss"], "s-", label="validation")
            ax_a.plot(h["epoch"], h["val_accuracy"], "s-", label="validation")
        ax_l.set(title=f"{label}: loss", xlabel="epoch", ylabel="cross-entropy")
        ax_a.set(title=f"{label}: accuracy", xlabel="epoch", ylabel="accuracy")
        for ax in (ax_l, ax_a):
            _integer_epochs(ax, h["epoch"])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def _has(h: dict, key: str) -> bool:
    """Whether history ``h`` recorded ``key`` (validation entries are None when a run had no validation split)."""
    return all(v is not None for v in h[key])


def _curve_key(histories: Sequence[dict], key: str) -> str:
    """``key``, or its training counterpart when a run has no validation split to plot."""
    if key.startswith("val_") and not all(_has(h, key) for h in histories):
        return "train_" + key[len("val_"):]
    return key


def plot_overlay(histories: Sequence[dict], labels: Sequence[str], path: Path, key: str = "val_accuracy",
                 title: str = "") -> None:
    """``key`` per epoch for every run on one axis."""
    plt = pyplot()
    key = _curve_key(histories, key)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for h, label in zip(histories, labels, strict=True):
        ax.plot(h["epoch"], h[key], "o-", label=label)
    ax.set(xlabel="epoch", ylabel=key.replace("_", " "), title=title)
    _integer_epochs(ax, histories[0]["epoch"])
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_seed_band(histories: Sequence[dict], path: Path, key: str = "val_accuracy", title: str = "") -> None:
    """``key`` per epoch: every seed as a thin line, their mean and a +-1 std band."""
    plt = pyplot()
    key = _curve_key(histories, key)
    epochs = np.asarray(histories[0]["epoch"])
    values = np.asarray([h[key] for h in histories], np.float64)
    mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(len(epochs))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in values:
        ax.plot(epochs, v, color="gray", lw=0.8, alpha=0.5)
    if len(epochs) > 1:
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.3, label="mean +- std")
    else:  # a band over one epoch has no width: an error bar shows the spread
        ax.errorbar(epochs, mean, yerr=std, fmt="none", capsize=6, label="mean +- std")
    ax.plot(epochs, mean, "o-", lw=2, label=f"mean of {plural(len(values), 'seed')}")
    ax.set(xlabel="epoch", ylabel=key.replace("_", " "), title=title)
    _integer_epochs(ax, epochs)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_prediction_grid(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                         path: Path, title: str = "", cols: int = 8) -> None:
    """uint8 images [N, 32, 32, 3] titled with the predicted class and its probability: green when right,
    red when wrong (the true class follows a wrong prediction)."""
    plt = pyplot()
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, y, p in zip(axes.flat, images, labels, probs, strict=False):
        pred = int(p.argmax())
        ax.imshow(img, interpolation="nearest")
        text = f"{class_names[pred]} {p[pred]:.2f}" + ("" if pred == y else f"\n(true: {class_names[y]})")
        ax.set_title(text, fontsize=7, color="green" if pred == y else "red")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_class_histograms(counts: dict[str, np.ndarray], class_names: Sequence[str], path: Path) -> None:
    """One bar chart of examples per class for each split in ``counts``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(counts), figsize=(max(6, 0.35 * len(class_names)) * len(counts), 3.8),
                             squeeze=False)
    for ax, (split, c) in zip(axes[0], counts.items(), strict=True):
        ax.bar(range(len(c)), c)
        ax.set(title=f"{split}: {int(np.sum(c))} images", ylabel="images")
        ax.set_xticks(range(len(c)), class_names if len(class_names) <= 20 else [""] * len(c), rotation=60,
                      fontsize=7)
    save_figure(fig, path)


def plot_image_row(images: np.ndarray, titles: Sequence[str], path: Path, title: str = "",
                   cmap_range: tuple[float, float] | None = None) -> None:
    """Images side by side; float images are shown per-image min-max scaled unless ``cmap_range`` is given."""
    plt = pyplot()
    cols = min(10, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t in zip(axes.flat, images, titles, strict=False):
        if img.dtype != np.uint8:
            lo, hi = cmap_range or (float(img.min()), float(img.max()))
            img = np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1)
        ax.imshow(img, interpolation="nearest")
        ax.set_title(t, fontsize=7)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_bars(values: Sequence[float], labels: Sequence[str], path: Path, xlabel: str = "", ylabel: str = "",
              title: str = "") -> None:
    """One bar per value with its figure on top, and the mean as a dashed line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(values) + 2), 4))
    bars = ax.bar(range(len(values)), values, tick_label=list(labels))
    ax.bar_label(bars, fmt="%.4f", fontsize=7)
    ax.axhline(float(np.mean(values)), ls="--", color="gray", label=f"mean {np.mean(values):.4f}")
    low = min(values)
    ax.set_ylim(max(0.0, low - 0.1 * (max(values) - low + 0.01) - 0.01), None)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    save_figure(fig, path)
