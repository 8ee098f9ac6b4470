"""Every batch-norm model trained in bfloat16 against float32, seed by seed, on real CIFAR-10.

    python benchmarks/bf16_accuracy.py --data ../shared/data/cifar10_jpeg.zip [--models improved resnet20 speedrun]
        [--images 10000] [--test-images 10000] [--epochs 5] [--seeds 3] [--out runs/bf16_accuracy]

The evidence that the batch-norm fix holds beyond the speed preset on generated data: each model trains on
the same stratified subset with the same seed in both compute dtypes (parameters, optimizer state,
batch-norm statistics and logits stay float32 in both), and the table gives the test accuracy per seed,
the paired difference bf16 − float32 and the epoch time. Models:

- ``improved``: ``configs.improved`` (ConvNet with batch norm, GELU, AdamW, augmentation);
- ``resnet20``: ResNet-20 with the same recipe (no dropout: the ResNets have none);
- ``speedrun``: ``configs.speedrun`` (airbench94's recipe), its schedule compressed into ``--epochs``.

On a GPU this is what ``--dtype auto`` does; on a CPU bfloat16 runs through XLA:CPU's own kernels
(``experiments.speedrun`` refuses it there unless ``--cpu-bfloat16``; this benchmark wants it).
``gpu_suite.py`` runs the same rows (its ``bf16`` section).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import jaxcifar  # noqa: F401  (sets the XLA:CPU flags before JAX starts)
from jaxcifar import configs
from jaxcifar.data import Dataset, load_cifar
from jaxcifar.report import write_json, write_text
from jaxcifar.train import TrainConfig, fit
from jaxcifar.versions import environment

MODELS: dict[str, Callable[[int], TrainConfig]] = {
    "improved": lambda epochs: configs.improved(epochs=epochs),
    "resnet20": lambda epochs: configs.improved(epochs=epochs, model="resnet20", model_kwargs={}, dropout_rate=0.0),
    "speedrun": lambda epochs: configs.speedrun(epochs=epochs),
}


def model_rows(data: Dataset, models: list[str], epochs: int, seeds: int, overrides: dict[str, Any] | None = None,
               log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per model: test accuracy per seed in float32 and bfloat16, their paired difference, and the
    mean epoch time of each dtype. ``overrides`` change every recipe (e.g. a smaller validation split)."""
    rows = []
    for name in models:
        config = MODELS[name](epochs).replace(**(overrides or {}))
        accuracy: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        seconds: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        for seed in range(seeds):
            for dtype in accuracy:
                result = fit(config.replace(dtype=dtype, seed=seed), data, progress=False)
                accuracy[dtype].append(result.summary["final_test_accuracy"])
                seconds[dtype].append(float(np.mean(result.history["epoch_seconds"])))
                log(f"{name} seed {seed} {dtype}: test accuracy {accuracy[dtype][-1]:.4f}")
        difference = np.subtract(accuracy["bfloat16"], accuracy["float32"])
        rows.append({"what": "bf16 accuracy", "model": name, "epochs": epochs, "seeds": seeds,
                     "float32": accuracy["float32"], "bfloat16": accuracy["bfloat16"],
                     "difference_mean": float(difference.mean()),
                     "difference_std": float(difference.std(ddof=1)) if seeds > 1 else None,
                     "float32_epoch_seconds": float(np.mean(seconds["float32"])),
                     "bfloat16_epoch_seconds": float(np.mean(seconds["bfloat16"]))})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as one Markdown table."""
    lines = ["| model | epochs | float32 per seed | bfloat16 per seed | bf16 − f32 (mean ± std) | s/epoch f32, bf16 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        spread = "" if r["difference_std"] is None else f" ± {r['difference_std']:.4f}"
        lines.append(f"| {r['model']} | {r['epochs']} | {' / '.join(f'{a:.4f}' for a in r['float32'])} | "
                     f"{' / '.join(f'{a:.4f}' for a in r['bfloat16'])} | {r['difference_mean']:+.4f}{spread} | "
                     f"{r['float32_epoch_seconds']:.1f}, {r['bfloat16_epoch_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="CIFAR-10 zip or ImageFolder (default: tfds)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    p.add_argument("--images", type=int, default=10000, help="training images (a stratified subset)")
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="runs/bf16_accuracy")
    args = p.parse_args(argv)
    if min(args.images, args.test_images, args.epochs, args.seeds) < 1:
        p.error("--images, --test-images, --epochs and --seeds must be at least 1")
    t0 = time.perf_counter()
    data = load_cifar("cifar10", args.data).subset(args.images, args.test_images, seed=0)
    rows = model_rows(data, args.models, args.epochs, args.seeds)
    table = markdown(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = f"Backend {jax.default_backend()} ({jax.devices()[0].device_kind}), data {data.source}.\n\n"
    write_text(out / "bf16_accuracy.md", header + table)
    write_json(out / "bf16_accuracy.json", {"rows": rows, "args": vars(args), "seconds": time.perf_counter() - t0,
                                            "environment": environment()})
    print(table)


if __name__ == "__main__":
    main()
