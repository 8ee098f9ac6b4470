"""Robustness over seeds: one recipe trained with K seeds at once in ONE compiled program.

    python -m experiments.robustness --data ../shared/data/cifar10_jpeg.zip --seeds 10 [--quick]

Each seed has its own initialization, dropout stream, data order and augmentation stream; the train/validation
split is shared (seeded by --seed) unless --split-per-run gives every seed its own. Writes into --out:
results.json (per-seed figures, mean, std, min/max, 95 % t confidence interval, config, versions), report.md,
val_accuracy.png (mean curve, +-std band, every seed) and checkpoints/ (resumable: rerun the same command).
"""

from __future__ import annotations

from jaxcifar import cli, configs
from jaxcifar.report import (
    divergence_note,
    markdown_table,
    plot_seed_band,
    plural,
    seed_statistics,
    selection_split,
    write_json,
    write_text,
)
from jaxcifar.train import fit

RECIPES = {"baseline": configs.baseline, "improved": configs.improved}


def main(argv: list[str] | None = None) -> None:
    p = cli.common_parser(__doc__.splitlines()[0], epochs=4, batch_size=32, out="runs/robustness")
    p.add_argument("--seeds", type=int, default=10, help="number of seeds (seed, seed+1, ...)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="baseline")
    p.add_argument("--dropout", type=float, default=None, help="override the recipe's dropout rate")
    p.add_argument("--run-strategy", choices=["auto", "vmap", "loop"], default="auto",
                   help="how the seeds share the program: auto = loop on CPU, vmap on GPU/TPU")
    p.add_argument("--split-per-run", action="store_true",
                   help="each seed holds out its own validation set (default: one split, seeded by --seed)")
    p.add_argument("--runs-per-chunk", type=int, default=None, help="seeds compiled together (default: all "
                   "that fit in memory)")
    args = cli.parse(p, argv)
    if args.seeds < 2:
        p.error("--seeds must be at least 2 for a spread and a confidence interval")
    extra = {} if args.dropout is None else {"dropout_rate": args.dropout}
    config = RECIPES[args.recipe](batch_size=args.batch_size, epochs=args.epochs, val_size=args.val_size,
                                  seed=args.seed, split_seed=args.seed, run_strategy=args.run_strategy,
                                  runs_per_chunk=args.runs_per_chunk, devices=args.devices,
                                  split_per_run=args.split_per_run, **extra)
    config = cli.overridden(config, args)
    out = cli.out_dir(args)
    data = cli.load_data(args)
    runs = [{"seed": args.seed + k} for k in range(args.seeds)]
    result = fit(config, data, runs=runs, checkpoint_dir=str(out / "checkpoints"), resume=args.resume,
                 progress=not args.no_progress)

    stats = {key: seed_statistics([s[key] for s in result.summaries])
             for key in ("test_accuracy", "best_val_accuracy", "final_test_accuracy")}
    t = stats["test_accuracy"]
    write_json(out / "results.json", {
        "experiment": "robustness", "recipe": args.recipe, "data": data.source, "train_size": len(data.train),
        "test_size": len(data.test), "config": config.to_dict(), "runs": runs, "summaries": result.summaries,
        "statistics": stats, "histories": result.histories, "meta": result.meta,
    })
    plot_seed_band(result.histories, out / "val_accuracy.png",
                   title=f"{args.recipe}: {selection_split(result.histories)} accuracy over "
                         f"{plural(args.seeds, 'seed')}")
    rows = [[r["seed"], s["best_val_accuracy"], s["best_epoch"], s["test_accuracy"]]
            for r, s in zip(runs, result.summaries, strict=True)]
    srows = [[k, v["mean"], v["std"], v["min"], v["max"], f"[{v['ci95_low']:.4f}, {v['ci95_high']:.4f}]"]
             for k, v in stats.items()]
    env, meta = result.meta["environment"], result.meta
    write_text(out / "report.md", "\n\n".join(filter(None, [  # paragraphs; an empty one is left out
        f"# Robustness over {args.seeds} seeds ({args.recipe} recipe)",
        f"{cli.data_line(data, config.val_size)} "
        f"{'Each seed splits its own validation set' if args.split_per_run else f'Split seed {args.seed}'}; "
        f"{config.epochs} epochs, "
        f"batch {config.batch_size}. "
        f"All seeds in one compiled program ({meta['run_strategy']}, {meta['runs_per_chunk']} runs per "
        f"program), backend {env['backend']}, jax {env['packages']['jax']}.",
        f"**Test accuracy {t['mean']:.4f} +- {t['std']:.4f} (mean +- std over {t['n']} seeds), 95 % CI "
        f"[{t['ci95_low']:.4f}, {t['ci95_high']:.4f}], range [{t['min']:.4f}, {t['max']:.4f}].**",
        markdown_table(["metric", "mean", "std", "min", "max", "95 % CI (t)"], srows),
        markdown_table(["seed", "best val acc", "best epoch", "test acc (best-val weights)"], rows),
        divergence_note([f"seed {r['seed']}" for r in runs], result.summaries),
        "![validation accuracy over seeds](val_accuracy.png)",
    ])) + "\n")
    print(f"test accuracy {t['mean']:.4f} +- {t['std']:.4f} over {t['n']} seeds; results in {out}")


if __name__ == "__main__":
    cli.run_main(main)
