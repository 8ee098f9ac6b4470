"""The classic ConvNet with dropout p in {0, 0.2, 0.5, 0.8}, all rates (x seeds) trained at once as ONE
compiled program vmapped over the rates.

    python -m experiments.dropout_sweep --data ../shared/data/cifar10_jpeg.zip [--quick] [--seeds 3]

Writes into --out: results.json (every figure, config, versions; the comparison over seeds and the per-run
score matrix), report.md, forest.png (each rate's interval and its paired difference from the best),
curves.png (per run), val_accuracy.png (overlay), and Orbax checkpoints (resumable: rerun the same command).
A winner is named only when its paired difference from every other rate is significant (Holm-adjusted).
"""

from __future__ import annotations

import itertools

from jaxcifar import cli, configs
from jaxcifar.compare import SCORE_METRICS, compare_scores, score_matrix, scores_by, verdict
from jaxcifar.report import (
    comparison_tables,
    divergence_note,
    markdown_table,
    plot_curves,
    plot_forest,
    plot_overlay,
    wilson_table,
    write_json,
    write_text,
)

METRIC = "test_accuracy"  # of the best-validation weights: 10,000 test images are less noisy than the validation


def main(argv: list[str] | None = None) -> None:
    p = cli.common_parser(__doc__.splitlines()[0], epochs=20, batch_size=32, out="runs/dropout_sweep")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.2, 0.5, 0.8])
    p.add_argument("--seeds", type=int, default=3,
                   help="seeds per rate (seed, seed+1, ...): the same seeds for every rate, so runs pair up")
    args = cli.parse(p, argv)
    config = configs.baseline(batch_size=args.batch_size, epochs=args.epochs, val_size=args.val_size,
                              seed=args.seed, devices=args.devices)
    config = cli.overridden(config, args)
    runs = [{"dropout_rate": r, "seed": args.seed + s} for r, s in itertools.product(args.rates, range(args.seeds))]
    out, data, result = cli.train(config, args, runs=runs)

    labels = [f"p={r['dropout_rate']:g} seed={r['seed']}" for r in runs]
    comparison = compare_scores(scores_by(runs, result.summaries, "dropout_rate", METRIC), n_test=len(data.test))
    write_json(out / "results.json", {
        "experiment": "dropout_sweep", "data": data.source, "train_size": len(data.train),
        "test_size": len(data.test), "config": config.to_dict(), "runs": runs, "summaries": result.summaries,
        "compared_on": METRIC, "comparison": comparison, "winner_rate": comparison["winner"],
        "scores": score_matrix(runs, result.summaries, lambda r: r["dropout_rate"], SCORE_METRICS),
        "histories": result.histories, "meta": result.meta,
    })
    rows = [[f"{r['dropout_rate']:g}", r["seed"], s["best_val_accuracy"], s["best_epoch"], s["test_accuracy"],
             s["final_test_accuracy"]] for r, s in zip(runs, result.summaries, strict=True)]
    table = markdown_table(["dropout p", "seed", "best val acc", "best epoch", "test acc (best-val weights)",
                            "test acc (last epoch)"], rows)
    plot_curves(result.histories, labels, out / "curves.png", "Dropout sweep: train vs validation")
    plot_overlay(result.histories, labels, out / "val_accuracy.png", title="Validation accuracy per dropout rate")
    plot_forest(comparison, out / "forest.png", METRIC, title="Dropout rates over seeds")
    line = verdict(comparison, "p")
    env = result.meta["environment"]
    write_text(out / "report.md", "\n\n".join(filter(None, [  # paragraphs; an empty one is left out
        "# Dropout sweep (classic ConvNet)",
        f"{cli.data_line(data, config.val_size)} {config.epochs} epochs, SGD lr {config.learning_rate} momentum "
        f"{config.momentum}, batch {config.batch_size}. All {len(runs)} runs trained in one compiled program "
        f"({result.meta['run_strategy']}, {result.meta['runs_per_chunk']} runs per program), "
        f"backend {env['backend']}, jax {env['packages']['jax']}.",
        table,
        divergence_note(labels, result.summaries),
        f"## Comparison over seeds ({METRIC}, paired by seed)",
        comparison_tables(comparison, "dropout p"),
        wilson_table(comparison, "dropout p") if comparison["variants"][comparison["best"]]["n"] < 2 else "",
        f"**{line}**",
        "![forest plot](forest.png)\n\n![curves](curves.png)\n\n![validation accuracy](val_accuracy.png)",
    ])) + "\n")
    print(table)
    print(comparison_tables(comparison, "dropout p"))
    print(f"{line} Results in {out}")


if __name__ == "__main__":
    cli.run_main(main)
