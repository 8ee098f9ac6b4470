"""A look at the data before training: split sizes, class histograms, one image per class (raw and
normalized), channel mean/std against the standard values, and the normalization check.

    python -m experiments.dataset_report --data ../shared/data/cifar10_jpeg.zip

Writes into --out: results.json, report.md, class_histograms.png, examples.png, examples_normalized.png.
"""

from __future__ import annotations

import numpy as np

from jaxcifar import cli
from jaxcifar.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    channel_stats,
    check_normalized,
    class_counts,
    normalize,
    train_val_split,
)
from jaxcifar.report import markdown_table, plot_class_histograms, plot_image_row, write_json, write_text
from jaxcifar.versions import environment

STANDARD = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}


def main(argv: list[str] | None = None) -> None:
    p = cli.common_parser(__doc__.splitlines()[0], epochs=0, batch_size=0, out="runs/dataset_report")
    args = cli.parse(p, argv)
    out = cli.out_dir(args)
    ds = cli.load_data(args)
    train, val = train_val_split(ds.train, args.val_size, args.seed) if args.val_size else (ds.train, None)
    names = list(ds.class_names)
    k = ds.num_classes
    counts = {"train": class_counts(train.labels, k), "test": class_counts(ds.test.labels, k)}
    if val is not None:
        counts["validation"] = class_counts(val.labels, k)
    mean, std = (np.asarray(v, np.float64) for v in channel_stats(train.images))
    ref_mean, ref_std = STANDARD[args.dataset]
    check = check_normalized(ds.test.images, mean, std, atol=0.05)
    check_train = check_normalized(train.images, mean, std)
    first = [int(np.flatnonzero(train.labels == c)[0]) for c in range(k) if (train.labels == c).any()][:20]
    plot_class_histograms(counts, names, out / "class_histograms.png")
    plot_image_row(train.images[first], [names[train.labels[i]] for i in first], out / "examples.png",
                   "One training image per class")
    normed = np.asarray(normalize(train.images[first], mean, std))
    plot_image_row(normed, [names[train.labels[i]] for i in first], out / "examples_normalized.png",
                   "The same images normalized (shown on a common scale of -2.5..2.5 std)", cmap_range=(-2.5, 2.5))
    sizes = {"train": len(train), "validation": 0 if val is None else len(val), "test": len(ds.test)}
    write_json(out / "results.json", {
        "experiment": "dataset_report", "dataset": args.dataset, "data": ds.source, "sizes": sizes,
        "class_names": names, "class_counts": {s: c.tolist() for s, c in counts.items()},
        "train_mean": mean.tolist(), "train_std": std.tolist(), "standard_mean": ref_mean, "standard_std": ref_std,
        "normalization_check_train": check_train, "normalization_check_test": check, "val_size": args.val_size,
        "seed": args.seed, "environment": environment(),
    })
    stat_rows = [[ch, mean[i], ref_mean[i], mean[i] - ref_mean[i], std[i], ref_std[i], std[i] - ref_std[i]]
                 for i, ch in enumerate("RGB")]
    write_text(out / "report.md", "\n\n".join([
        f"# Dataset report: {args.dataset}",
        f"Source: {ds.source}. Validation: {sizes['validation']} images held out of the training set "
        f"(seed {args.seed}).",
        markdown_table(["split", "images"], [[s, n] for s, n in sizes.items()]),
        "![class histograms](class_histograms.png)",
        markdown_table(["class", *counts], [[n, *(int(c[i]) for c in counts.values())] for i, n in enumerate(names)]),
        "## Channel statistics (training split, pixels scaled to [0, 1])",
        markdown_table(["channel", "mean", "standard mean", "diff", "std", "standard std", "diff"], stat_rows),
        "## Normalization check",
        f"Normalized with the training statistics, the training split has per-channel mean "
        f"{np.round(check_train['mean'], 4).tolist()} and std {np.round(check_train['std'], 4).tolist()} "
        f"({'ok' if check_train['ok'] else 'NOT ok'}); the test split has mean {np.round(check['mean'], 4).tolist()} "
        f"and std {np.round(check['std'], 4).tolist()} ({'ok' if check['ok'] else 'NOT ok'} within 0.05).",
        "![examples](examples.png)\n\n![normalized](examples_normalized.png)",
    ]) + "\n")
    print(f"{args.dataset}: {sizes}; train mean {np.round(mean, 4).tolist()} std {np.round(std, 4).tolist()} "
          f"(standard {ref_mean} / {ref_std}); results in {out}")


if __name__ == "__main__":
    cli.run_main(main)
