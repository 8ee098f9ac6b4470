"""The classic ConvNet with dropout p in {0, 0.2, 0.5, 0.8}, all rates (x seeds) trained at once as ONE
compiled program vmapped over the rates.

    python -m experiments.dropout_sweep --data ../shared/data/cifar10_jpeg.zip [--quick] [--seeds 3]

Writes into --out: results.json (every figure, config, versions), report.md, curves.png (per rate),
val_accuracy.png (overlay), and Orbax checkpoints (resumable: rerun the same command).
"""

from __future__ import annotations

import itertools

import numpy as np

from jaxcifar import cli, configs
from jaxcifar.report import divergence_note, markdown_table, plot_curves, plot_overlay, write_json, write_text


def main(argv: list[str] | None = None) -> None:
    p = cli.common_parser(__doc__.splitlines()[0], epochs=20, batch_size=32, out="runs/dropout_sweep")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.2, 0.5, 0.8])
    p.add_argument("--seeds", type=int, default=1, help="seeds per rate (seed, seed+1, ...)")
    args = cli.parse(p, argv)
    config = configs.baseline(batch_size=args.batch_size, epochs=args.epochs, val_size=args.val_size,
                              seed=args.seed, devices=args.devices)
    config = cli.overridden(config, args)
    runs = [{"dropout_rate": r, "seed": args.seed + s} for r, s in itertools.product(args.rates, range(args.seeds))]
    out, data, result = cli.train(config, args, runs=runs)

    labels = [f"p={r['dropout_rate']:g} seed={r['seed']}" for r in runs]
    per_rate = {}
    for rate in args.rates:
        idx = [i for i, r in enumerate(runs) if r["dropout_rate"] == rate]
        per_rate[rate] = {k: float(np.mean([result.summaries[i][k] for i in idx]))
                          for k in ("best_val_accuracy", "test_accuracy", "final_test_accuracy")}
    winner = max(per_rate, key=lambda r: per_rate[r]["best_val_accuracy"])
    write_json(out / "results.json", {
        "experiment": "dropout_sweep", "data": data.source, "train_size": len(data.train),
        "test_size": len(data.test), "config": config.to_dict(), "runs": runs, "summaries": result.summaries,
        "per_rate_mean": {str(k): v for k, v in per_rate.items()}, "winner_rate": winner,
        "histories": result.histories, "meta": result.meta,
    })
    rows = [[f"{r['dropout_rate']:g}", r["seed"], s["best_val_accuracy"], s["best_epoch"], s["test_accuracy"],
             s["final_test_accuracy"]] for r, s in zip(runs, result.summaries, strict=True)]
    table = markdown_table(["dropout p", "seed", "best val acc", "best epoch", "test acc (best-val weights)",
                            "test acc (last epoch)"], rows)
    plot_curves(result.histories, labels, out / "curves.png", "Dropout sweep: train vs validation")
    plot_overlay(result.histories, labels, out / "val_accuracy.png", title="Validation accuracy per dropout rate")
    env = result.meta["environment"]
    write_text(out / "report.md", "\n\n".join(filter(None, [  # paragraphs; an empty one is left out
        "# Dropout sweep (classic ConvNet)",
        f"{cli.data_line(data, config.val_size)} {config.epochs} epochs, SGD lr {config.learning_rate} momentum "
        f"{config.momentum}, batch {config.batch_size}. All {len(runs)} runs trained in one compiled program "
        f"({result.meta['run_strategy']}, {result.meta['runs_per_chunk']} runs per program), "
        f"backend {env['backend']}, jax {env['packages']['jax']}.",
        table,
        divergence_note(labels, result.summaries),
        f"**Winner by mean best validation accuracy: p = {winner:g}** "
        f"(val {per_rate[winner]['best_val_accuracy']:.4f}, test {per_rate[winner]['test_accuracy']:.4f}).",
        "![curves](curves.png)\n\n![validation accuracy](val_accuracy.png)",
    ])) + "\n")
    print(table)
    print(f"winner: p={winner:g}; results in {out}")


if __name__ == "__main__":
    cli.run_main(main)
