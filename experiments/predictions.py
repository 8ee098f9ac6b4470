"""Predictions of trained models on test images: a picture grid and the softmax probability table, for a
model fed normalized input and one fed raw [0, 1] input.

    python -m experiments.predictions --data ../shared/data/cifar10_jpeg.zip                 # trains both
    python -m experiments.predictions --data ... --checkpoint runs/baseline/checkpoints       # reuse a model

Without --checkpoint, trains the baseline ConvNet twice (normalized and raw input; --epochs, default 5) into
--out/models/. With --checkpoint DIR (repeatable), predicts with those models instead. Writes into --out:
grid_<model>.png, probabilities_<model>.csv / .md, report.md and results.json.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from jaxcifar import cli, configs
from jaxcifar.report import markdown_table, plot_prediction_grid, write_json, write_text
from jaxcifar.train import fit
from jaxcifar.train.predict import load_trained


def main(argv: list[str] | None = None) -> None:
    p = cli.common_parser(__doc__.splitlines()[0], epochs=5, batch_size=32, out="runs/predictions")
    p.add_argument("--checkpoint", action="append", metavar="DIR", help="a fit checkpoint directory (repeatable)")
    p.add_argument("--count", type=int, default=24, help="test images to show")
    args = cli.parse(p, argv)
    to_train = {}  # without --checkpoint: a model on normalized and one on raw input, checked before any work
    for normalize in () if args.checkpoint else (True, False):
        config = configs.baseline(batch_size=args.batch_size, epochs=args.epochs, val_size=args.val_size,
                                  seed=args.seed, normalize=normalize, devices=args.devices)
        to_train["normalized" if normalize else "raw"] = cli.overridden(config, args)
    out = cli.out_dir(args)
    data = cli.load_data(args)
    models = {}
    for path in args.checkpoint or []:
        trained = load_trained(path, num_classes=data.num_classes)
        models[f"{'normalized' if trained.config.normalize else 'raw'}-{len(models)}"] = trained
    for name, config in to_train.items():
        directory = out / "models" / name
        fit(config, data, checkpoint_dir=str(directory), resume=args.resume,
            progress=not args.no_progress)
        models[name] = load_trained(directory)

    pick = np.random.default_rng(args.seed).choice(len(data.test), size=min(args.count, len(data.test)),
                                                   replace=False)
    images, labels = data.test.images[pick], data.test.labels[pick]
    names = list(data.class_names)
    summary, sections = {}, []
    for name, trained in models.items():
        probs = trained.probabilities(images)
        accuracy = float((trained.probabilities(data.test.images).argmax(-1) == data.test.labels).mean())
        plot_prediction_grid(images, labels, probs, names, out / f"grid_{name}.png",
                             f"{name} input: test accuracy {accuracy:.3f}")
        rows = [[int(i), names[y], names[int(pr.argmax())], *[f"{v:.3f}" for v in pr]]
                for i, y, pr in zip(pick, labels, probs, strict=True)]
        header = ["test index", "true", "predicted", *names]
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        write_text(out / f"probabilities_{name}.csv", buf.getvalue())
        table = markdown_table(header, rows)
        write_text(out / f"probabilities_{name}.md", table + "\n")
        summary[name] = {"test_accuracy": accuracy, "epoch": trained.epoch, "normalize": trained.config.normalize,
                         "shown_correct": int((probs.argmax(-1) == labels).sum()),
                         "mean_confidence": float(probs.max(-1).mean()), "config": trained.config.to_dict()}
        sections += [f"## {name} input (checkpoint epoch {trained.epoch}, test accuracy {accuracy:.4f})",
                     f"![{name}](grid_{name}.png)", table]
    write_json(out / "results.json", {"experiment": "predictions", "data": data.source, "shown": pick.tolist(),
                                      "models": summary, "environment": next(iter(models.values())).meta.get(
                                          "environment")})
    write_text(out / "report.md", "\n\n".join([
        "# Predictions on test images",
        "Green titles are right, red wrong; each shows the predicted class and its softmax probability.",
        markdown_table(["model", "test accuracy", "shown right", "mean top probability"],
                       [[k, v["test_accuracy"], f"{v['shown_correct']}/{len(pick)}", v["mean_confidence"]]
                        for k, v in summary.items()]),
        *sections]) + "\n")
    for k, v in summary.items():
        print(f"{k}: test accuracy {v['test_accuracy']:.4f}")
    print(f"results in {out}")


if __name__ == "__main__":
    cli.run_main(main)
