"""The classic CIFAR-10 baseline: ConvNet, SGD lr 1e-3 momentum 0.9, batch 32, 20 epochs, 49000/1000 split.

    python -m experiments.baseline --data ../shared/data/cifar10_jpeg.zip [--quick]

Logs training loss/accuracy every 200 steps and validation every epoch. Writes into --out: results.json,
report.md, curves.png (train vs validation loss and accuracy) and the model as Orbax checkpoints
(checkpoints/: the latest epochs and the best by validation accuracy; rerun the same command to resume).
"""

from __future__ import annotations

from jaxcifar import cli, configs
from jaxcifar.report import epoch_table, plot_curves, write_json, write_text


def main(argv: list[str] | None = None) -> None:
    p = cli.common_parser(__doc__.splitlines()[0], epochs=20, batch_size=32, out="runs/baseline")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout before the classifier")
    args = cli.parse(p, argv)
    config = configs.baseline(batch_size=args.batch_size, epochs=args.epochs, val_size=args.val_size,
                              seed=args.seed, dropout_rate=args.dropout, devices=args.devices)
    config = cli.overridden(config, args)
    out, data, result = cli.train(config, args)
    s, h = result.summary, result.history
    write_json(out / "results.json", {
        "experiment": "baseline", "data": data.source, "train_size": len(data.train), "test_size": len(data.test),
        "config": config.to_dict(), "summary": s, "history": h, "meta": result.meta,
    })
    plot_curves([h], ["ConvNet baseline"], out / "curves.png", "Baseline: train vs validation")
    env = result.meta["environment"]
    write_text(out / "report.md", "\n\n".join([
        "# Baseline (classic ConvNet)",
        f"{cli.data_line(data, config.val_size)} SGD lr {config.learning_rate} momentum {config.momentum}, batch "
        f"{config.batch_size}, {config.epochs} epochs, seed {config.seed}; backend {env['backend']}, "
        f"jax {env['packages']['jax']}.",
        f"**Best validation accuracy {s['best_val_accuracy']:.4f} at epoch {s['best_epoch']}; test accuracy "
        f"{s['test_accuracy']:.4f}** with the best-validation weights ({s['final_test_accuracy']:.4f} with the "
        f"last epoch's).",
        epoch_table(h),
        "![curves](curves.png)",
        "The model is saved with Orbax in `checkpoints/` (latest and best); load it with "
        "`jaxcifar.train.restore(dir, target, 'best')` or run `python -m experiments.predictions`.",
    ]) + "\n")
    print(f"best {s['selected_on']} acc {s['best_val_accuracy']:.4f} (epoch {s['best_epoch']}), "
          f"test {s['test_accuracy']:.4f}; results in {out}")


if __name__ == "__main__":
    cli.run_main(main)
