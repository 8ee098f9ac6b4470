"""Compute each named recipe costs: FLOPs per training image (forward + backward + update, XLA's own count
of the library's train step) and per evaluated image, and the total of a run (epochs x training images x
runs), beside a measured training throughput on this machine when --measure is given.

    python benchmarks/recipe_cost.py [--recipes d_wide c_improved ...] [--width 0.125] [--runs 10] [--measure]

FLOPs come from ``jax.jit(...).lower(...).compile().cost_analysis()``: they count what XLA runs (a multiply-
add is 2), so they depend on the backend only through fusion, not on the machine's speed. Use them to state a
reproduction's cost; use --measure (images/s of one unrolled 16-step chunk after compile) for this machine.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import jaxcifar  # noqa: F401  (sets the XLA:CPU flags before JAX starts)
from jaxcifar import configs
from jaxcifar.data.split import validation_count
from jaxcifar.data.synthetic import synthetic_cifar
from jaxcifar.train import build, init_state, make_chunk_runner, prepare_data


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    return float(analysis.get("flops", float("nan")))


def recipe_cost(name: str, width: float | None, measure: bool, batch: int = 32) -> dict[str, float]:
    """FLOPs per image of a train step and of an evaluation forward pass (and images/s with ``measure``)."""
    extra = {"width": width} if width is not None and name in configs.WIDTH_RECIPES else {}
    config = configs.reference(name, batch_size=batch, val_size=0, augment=(), **extra)
    num_classes = 100 if name.startswith("b") else 10
    data = prepare_data(synthetic_cifar(256, 64, num_classes=num_classes), config)
    fns = build(config, data)
    state = init_state(config, fns)
    images, labels = data.train
    index = np.arange(batch)
    key = jax.random.PRNGKey(0)
    train = jax.jit(lambda s: fns.train_step(s, (images[index], labels[index]), key)).lower(state).compile()
    forward = jax.jit(fns.probabilities).lower(state.variables, images[index]).compile()
    out = {"train_flops_per_image": _flops(train) / batch, "eval_flops_per_image": _flops(forward) / batch}
    if measure:
        run = jax.jit(make_chunk_runner(fns, unroll=True))
        chunk = np.stack([np.random.default_rng(i).integers(0, len(labels), batch) for i in range(16)])
        state, _ = run(state, images, labels, chunk)  # compile
        jax.block_until_ready(state)
        t = time.perf_counter()
        state, _ = run(state, images, labels, chunk)
        jax.block_until_ready(state)
        out["train_images_per_second"] = 16 * batch / (time.perf_counter() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["d_wide", "d_improved", "c_improved", "e_improved"])
    p.add_argument("--width", type=float, default=None, help="width factor for the report D nets")
    p.add_argument("--runs", type=int, default=1, help="runs (seeds) for the total")
    p.add_argument("--measure", action="store_true", help="also measure training images/s here")
    args = p.parse_args()
    print(f"backend {jax.default_backend()}, jax {jax.__version__}")
    for name in args.recipes:
        config = configs.reference(name)
        train_size = 50000 - validation_count(50000, config.val_size)
        c = recipe_cost(name, args.width, args.measure)
        total = c["train_flops_per_image"] * train_size * config.epochs * args.runs
        line = (f"{name:12s} width {args.width or 1:g}: {c['train_flops_per_image'] / 1e9:8.3f} GFLOP per training "
                f"image, {c['eval_flops_per_image'] / 1e9:8.3f} per evaluated image; {config.epochs} epochs x "
                f"{train_size} images x {args.runs} runs = {total / 1e15:8.3f} PFLOP")
        if "train_images_per_second" in c:
            hours = config.epochs * train_size * args.runs / c["train_images_per_second"] / 3600
            line += f"; {c['train_images_per_second']:.0f} images/s here = {hours:.1f} h"
        print(line, flush=True)


if __name__ == "__main__":
    main()
