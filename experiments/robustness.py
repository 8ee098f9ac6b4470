"""Robustness over seeds: one recipe trained with K seeds at once in ONE compiled program, then evaluated together.

    python -m experiments.robustness --data ../shared/data/cifar10_jpeg.zip --seeds 10 [--quick]
    python -m experiments.robustness --recipe d_wide --width 0.125 --data ...   # report D's 10-seed study, CPU-sized

Each seed has its own initialization, dropout stream, data order and augmentation stream; the train/validation
split is shared (seeded by --seed) unless --split-per-run gives every seed its own. The K trained models are then
evaluated in one program: their ensemble, pairwise disagreement, per-class accuracy, calibration (ECE, NLL,
Brier, reliability diagram) and accuracy under CIFAR-10-C corruptions generated on the device (--corruptions).
Writes into --out: results.json (every figure, config, versions), report.md, val_accuracy.png (mean curve,
+-std band), ensemble.png, disagreement.png, per_class_accuracy.png, reliability.png, corruptions.png and
checkpoints/ (resumable: rerun the same command; a finished training is only evaluated again).
"""

from __future__ import annotations

import argparse
import functools

from jaxcifar import cli, configs
from jaxcifar.data.corruptions import SEVERITIES, corruption_names
from jaxcifar.errors import ConfigError
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
from jaxcifar.robustness import evaluate_robustness, tfds_corruptions
from jaxcifar.robustness_report import write_robustness_report
from jaxcifar.train import TrainConfig

RECIPES = {"baseline": configs.baseline, "improved": configs.improved,
           **{name: functools.partial(configs.reference, name) for name in configs.reference_names()}}
WIDTH_RECIPES = ("improved", *configs.WIDTH_RECIPES)


def _recipe_defaults(argv: list[str] | None) -> TrainConfig:
    """The chosen recipe's own config (before the command line's changes), for the parser's defaults: the
    reference recipes train with their own epochs, batch, split and seed unless told otherwise."""
    name = cli.preparsed(argv, "--recipe", "baseline")
    if name in ("baseline", "improved"):  # 4 epochs: the reference's 10-seed study
        return RECIPES[name](epochs=4)
    return RECIPES.get(name, configs.baseline)()


def _parser(argv: list[str] | None) -> argparse.ArgumentParser:
    recipe = cli.preparsed(argv, "--recipe", "baseline")
    dataset = "cifar100" if recipe in configs.REPORT_B else "cifar10"
    p = cli.recipe_parser(__doc__.splitlines()[0], _recipe_defaults(argv), "runs/robustness", dataset)
    p.add_argument("--seeds", type=int, default=10, help="number of seeds (seed, seed+1, ...)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="baseline",
                   help="a named recipe: baseline, improved or a reference report's (jaxcifar.configs.reference)")
    p.add_argument("--width", type=float, default=None,
                   help="scale the convs' widths (improved: an integer factor; d_wide, d_improved: any factor, "
                        "e.g. 0.125 for a CPU-sized report D net)")
    p.add_argument("--dropout", type=float, default=None, help="override the recipe's dropout rate")
    p.add_argument("--run-strategy", choices=["auto", "vmap", "loop"], default="auto",
                   help="how the seeds share the program: auto = loop on CPU, vmap on GPU/TPU")
    p.add_argument("--split-per-run", action="store_true",
                   help="each seed holds out its own validation set (default: one split, seeded by --seed)")
    p.add_argument("--runs-per-chunk", type=int, default=None, help="seeds compiled together (default: all "
                   "that fit in memory)")
    p.add_argument("--corruptions", default="all",
                   help="'all' (every corruption of jaxcifar.data.corruptions, generated on the device), 'none', "
                        "'tfds' (the published CIFAR-10-C images from tfds; needs the internet) or a comma-"
                        f"separated list of {corruption_names()}")
    p.add_argument("--severities", default="1,2,3,4,5", help="comma-separated corruption severities (1..5)")
    p.add_argument("--corruption-images", type=int, default=None,
                   help="corrupt a random subset of this many test images (default: all); each corruption x "
                        "severity costs one forward pass of every seed over them")
    return p


def _corruption_request(args: argparse.Namespace) -> tuple[list[str], list[int], bool]:
    """``(names, severities, from_tfds)`` from ``--corruptions`` and ``--severities``, checked."""
    from_tfds = args.corruptions == "tfds"
    if args.corruptions in ("all", "tfds"):
        names = corruption_names()
    elif args.corruptions == "none":
        names = []
    else:
        names = [n.strip() for n in args.corruptions.split(",") if n.strip()]
    unknown = sorted(set(names) - set(corruption_names()))
    if unknown:
        raise ConfigError(f"--corruptions: unknown {unknown}: use all, none, tfds or some of {corruption_names()}")
    try:
        severities = [int(s) for s in args.severities.split(",")]
    except ValueError:
        severities = []
    if not severities or not set(severities) <= set(SEVERITIES):
        raise ConfigError(f"--severities {args.severities!r}: give severities 1..5, e.g. --severities 1,3,5")
    if args.corruption_images is not None and args.corruption_images < 1:
        raise ConfigError(f"--corruption-images {args.corruption_images}: give a count >= 1 (or leave it out for "
                          "the whole test set)")
    if from_tfds and args.dataset != "cifar10":
        raise ConfigError("--corruptions tfds exists for CIFAR-10 only: use --corruptions all (generated)")
    return names, severities, from_tfds


def _config(p: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The recipe with the command line's changes, validated."""
    extra = {} if args.dropout is None else {"dropout_rate": args.dropout}
    if args.width is not None:
        if args.recipe not in WIDTH_RECIPES:
            p.error(f"--width applies to the recipes {WIDTH_RECIPES}, not {args.recipe}")
        if args.recipe == "improved" and not args.width.is_integer():
            p.error(f"--width {args.width:g}: the improved recipe takes a whole factor (1, 2, ...)")
        extra["width"] = int(args.width) if args.recipe == "improved" else args.width
    config = RECIPES[args.recipe](batch_size=args.batch_size, epochs=args.epochs, val_size=args.val_size,
                                  seed=args.seed, split_seed=args.seed, run_strategy=args.run_strategy,
                                  runs_per_chunk=args.runs_per_chunk, devices=args.devices,
                                  split_per_run=args.split_per_run, **extra)
    return cli.overridden(config, args)


def main(argv: list[str] | None = None) -> None:
    p = _parser(argv)
    args = cli.parse(p, argv)
    if args.seeds < 2:
        p.error("--seeds must be at least 2 for a spread and a confidence interval")
    config = _config(p, args)
    names, severities, from_tfds = _corruption_request(args)
    corrupted = tfds_corruptions() if from_tfds else None
    if corrupted is not None:
        corrupted(names[0], severities[0])  # fail now, not after training, when tfds cannot deliver them
    runs = [{"seed": args.seed + k} for k in range(args.seeds)]
    out, data, result = cli.train(config, args, runs=runs)
    figures = evaluate_robustness(result, data.test, corruptions=names, severities=severities, corrupted=corrupted,
                                  corruption_images=args.corruption_images, progress=not args.no_progress)

    stats = {key: seed_statistics([s[key] for s in result.summaries])
             for key in ("test_accuracy", "best_val_accuracy", "final_test_accuracy")}
    write_json(out / "results.json", {
        "experiment": "robustness", "recipe": args.recipe, "width": args.width, "data": data.source,
        "train_size": len(data.train), "test_size": len(data.test), "config": config.to_dict(), "runs": runs,
        "summaries": result.summaries, "statistics": stats, "robustness": figures, "histories": result.histories,
        "meta": result.meta,
    })
    labels = [f"seed {r['seed']}" for r in runs]
    plot_seed_band(result.histories, out / "val_accuracy.png",
                   title=f"{args.recipe}: {selection_split(result.histories)} accuracy over "
                         f"{plural(args.seeds, 'seed')}")
    paragraphs = _seed_paragraphs(args, config, data, result, stats)
    paragraphs += write_robustness_report(out, figures, labels, data.class_names)
    write_text(out / "report.md", "\n\n".join(filter(None, paragraphs)) + "\n")
    t = stats["test_accuracy"]
    print(f"test accuracy {t['mean']:.4f} +- {t['std']:.4f} over {t['n']} seeds, ensemble "
          f"{figures['clean']['ensemble']['accuracy']:.4f}; results in {out}")


def _seed_paragraphs(args, config, data, result, stats) -> list[str]:
    """The report's first part: setup, the headline mean +- std, the per-seed table."""
    t = stats["test_accuracy"]
    rows = [[r["seed"], s["best_val_accuracy"], s["best_epoch"], s["test_accuracy"]]
            for r, s in zip(result.runs, result.summaries, strict=True)]
    srows = [[k, v["mean"], v["std"], v["min"], v["max"], f"[{v['ci95_low']:.4f}, {v['ci95_high']:.4f}]"]
             for k, v in stats.items()]
    env, meta = result.meta["environment"], result.meta
    width = "" if args.width is None else f" at width {args.width:g}"
    split = "Each seed splits its own validation set" if args.split_per_run else f"Split seed {args.seed}"
    return [
        f"# Robustness over {args.seeds} seeds ({args.recipe} recipe{width})",
        f"{cli.data_line(data, config.val_size)} {split}; {config.epochs} epochs, batch {config.batch_size}. "
        f"All seeds in one compiled program ({meta['run_strategy']}, {meta['runs_per_chunk']} runs per "
        f"program), backend {env['backend']}, jax {env['packages']['jax']}.",
        f"**Test accuracy {t['mean']:.4f} +- {t['std']:.4f} (mean +- std over {t['n']} seeds), 95 % CI "
        f"[{t['ci95_low']:.4f}, {t['ci95_high']:.4f}], range [{t['min']:.4f}, {t['max']:.4f}].**",
        markdown_table(["metric", "mean", "std", "min", "max", "95 % CI (t)"], srows),
        markdown_table(["seed", "best val acc", "best epoch", "test acc (best-val weights)"], rows),
        divergence_note([f"seed {r['seed']}" for r in result.runs], result.summaries),
        "![validation accuracy over seeds](val_accuracy.png)",
    ]


if __name__ == "__main__":
    cli.run_main(main)
